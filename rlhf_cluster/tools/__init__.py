"""Tools a policy calls in a multi-turn episode: the call format, a calculator, and Python run in
a sandbox (`sandbox.py`). Ray-free."""
