"""Methods: one registry for prompting, tuning and reward-based methods (docs/adding-a-method.md).

- registry.py  `Method`, `METHODS`, `register_method`, and `NEEDS` (the data a method can need)
- catalog.py   every built-in method imported (so registered); `get_method`, `all_methods`, `method_config`,
               `split_overrides`, `run_method`: what `hone prompt|tune|align|compare|advise` and the report read
"""
