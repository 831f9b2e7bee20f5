"""The output-dir rule for every curate command that writes shards or tables (run, filter, report).

:func:`clipforge.utils.prepare_output_dir` is the project's rule (a non-empty dir is refused unless
``--overwrite`` replaces it or the command resumes it); on top of it, an output dir may never hold
what the command reads (``--output`` = the scores dir, or a dir of the input shards), so that
``--overwrite`` can never delete the inputs it is about to read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from clipforge.data.shards import is_remote
from clipforge.utils import OutputExistsError, prepare_output_dir


def prepare_output(
    out: str | Path, *, overwrite: bool = False, resume: bool = False, inputs: Iterable[str | Path] = ()
) -> Path:
    """Check that ``out`` holds none of ``inputs``, then apply the output-dir rule; returns ``out``."""
    out = Path(out)
    root = out.resolve()
    for p in inputs:
        if is_remote(str(p)):
            continue
        r = Path(p).resolve()
        if r == root or root in r.parents:
            raise OutputExistsError(
                f"--output {out} holds an input of this command ({str(p)[:200]}); choose another --output"
            )
    return prepare_output_dir(out, overwrite=overwrite, resume=resume)
