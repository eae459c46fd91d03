"""The README's client example names methods and arguments the client has (its calls are
bound to the real signatures; tests/client runs each method against the service)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from regcl.client import Client

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text()
    found = re.search(r"From Python.*?```python\n(.*?)```", text, re.S)
    assert found, "no client example in the README"
    return found.group(1)


def test_the_readme_client_example_binds_to_the_client():
    source = _example()
    assert len(source.strip().splitlines()) <= 5
    tree = ast.parse(source)
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    bound = set()
    for call in calls:
        func = call.func
        if isinstance(func, ast.Name) and func.id == "Client":
            target = Client.__init__
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                and func.value.id == "c":
            assert hasattr(Client, func.attr), func.attr
            target = getattr(Client, func.attr)
        else:
            continue
        args = [None] * len(call.args)  # only the shape of the call is checked
        kwargs = {k.arg: None for k in call.keywords}
        inspect.signature(target).bind(None, *args, **kwargs)  # TypeError if it does not fit
        bound.add(getattr(func, "attr", "Client"))
    assert {"Client", "segment", "upload_dataset", "submit_train", "wait"} <= bound
