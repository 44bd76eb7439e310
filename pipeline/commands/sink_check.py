"""`verify`'s look at the sinks: each [[sink]] the folder's job names compared with the
committed parts (counts, the id sets, every row's vector digest or with --quick a sample of
vectors), one line per problem."""
from __future__ import annotations

from ..config import ConfigError
from ..io.ledger import Ledger
from ..sinks.base import SinkError, close_all, compare_sink
from ..sinks.make import sinks_of


def sink_problems(ledger: Ledger, checked: list[str], full: bool = True) -> list[str]:
    """Problems of every sink; `checked` gets the names of those compared."""
    config = ledger.manifest.config or {}
    problems = []
    for raw in config.get("sink") or []:
        name = raw.get("name", "?")
        sinks = []
        try:
            sinks = sinks_of({**config, "sink": [raw]})
            for sink in sinks:
                sink.open()
                problems += compare_sink(sink, ledger, full=full)
                checked.append(name)
        except (ConfigError, SinkError) as exc:
            why = str(exc)
            problems.append(why if why.startswith('sink "') else f'sink "{name}": {why}')
        finally:
            close_all(sinks)
    return problems
