"""Click commands that live in their own modules; `mlxlora.cli` registers each one."""
