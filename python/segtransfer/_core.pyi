# The compiled extension (cpp/bindings): its functions are called only by this package's typed
# wrappers (_api.py, _device.py, _cli.py), which check and convert every argument first.
from typing import Any

def __getattr__(name: str) -> Any: ...
