"""An Ollama `Modelfile` for an exported GGUF: FROM, the chat TEMPLATE in Ollama's Go-template syntax, stops.

A Jinja chat template cannot be translated in general, so the common families are recognised by a
marker they all contain (TEMPLATES); for another template the Modelfile says that TEMPLATE must be
written by hand. The stop tokens are the family's end-of-turn marker plus the tokenizer's EOS.
"""

from __future__ import annotations

# marker in the Jinja template -> (Ollama TEMPLATE, end-of-turn stop token)
TEMPLATES = {
    "<|im_start|>": (  # ChatML: SmolLM2, Qwen2/3
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        "<|im_end|>"),
    "<|start_header_id|>": (  # Llama 3
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>"),
    "<start_of_turn>": (  # Gemma: the assistant's role is "model"
        "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        "<end_of_turn>"),
}


def modelfile(gguf_name: str, chat_template: str | None, eos: str | None) -> str:
    """The text of a Modelfile that runs `gguf_name` (a file beside it) with its chat format."""
    lines = [f"FROM ./{gguf_name}"]
    stops = []
    family = next((m for m in TEMPLATES if chat_template and m in chat_template), None)
    if family is not None:
        template, stop = TEMPLATES[family]
        lines.append(f'TEMPLATE """{template}"""')
        stops.append(stop)
    elif chat_template:
        lines.append("# mlxlora knows no Ollama TEMPLATE for this model's chat template (it is stored in the "
                     "GGUF as tokenizer.chat_template); write one by hand")
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


__all__ = ["TEMPLATES", "modelfile"]
