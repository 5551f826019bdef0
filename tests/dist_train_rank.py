"""Run by tests/test_distributed.py under `mlx.launch` (or alone): train a tiny model, dump this rank's adapter.

usage: python train_rank.py MODEL DATA OUT BATCH STEPS [METHOD]
"""

import sys
from pathlib import Path

import mlx.core as mx

from mlxlora import LoraConfig, TrainConfig
from mlxlora.config import PreferenceConfig
from mlxlora.lora.surgery import adapter_parameters
from mlxlora.train import Trainer

model, data, out, batch, steps = sys.argv[1:6]
method = sys.argv[6] if len(sys.argv) > 6 else "sft"
cfg = TrainConfig(model=model, data=data, adapter_path=out, iters=int(steps), batch_size=int(batch), lr=3e-3,
                  save_every=2, seed=5, pack=False if method == "sft" else None,
                  lora=LoraConfig(r=4, target_modules="all-linear"), preference=PreferenceConfig(method=method))
trainer = Trainer(cfg)
trainer.run()
rank = trainer.group.rank()
mx.save_safetensors(str(Path(out + f".rank{rank}.safetensors")), adapter_parameters(trainer.base.model))
print(f"rank {rank} of {trainer.group.size()} done", flush=True)
