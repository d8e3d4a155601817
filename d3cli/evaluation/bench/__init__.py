"""`d3 bench` runs: full depth against D3 and matched-compute baselines, on the same examples, resumable.

Methods, in the order they run: `full` (every layer, the reference), `d3` at each α, then for each α the baselines
matched to that D3 run's mean depth over its generated tokens: `static` (one depth for every token after the first,
the same skip order) and `linear` (SkipDecode-style: depth falls linearly with position). Each of d3, static and
linear also comes as `METHOD+bridges`: the same schedule with the model's calibrated bridges standing in for the
skipped runs (the plain methods skip them); a bridged baseline is matched to the bridged D3 run.

Every finished example is appended to a JSONL file at once (flushed and fsynced); `--resume` reads it back and runs
only what is missing, and the summary is computed from that file alone, so an interrupted-and-resumed run and an
uninterrupted one summarize the same records.

Data-parallel (`accelerate launch`): each process decodes a strided share of each method's unfinished examples and
appends to its own rank file, `OUTPUT.rank-R-of-W`; after each method the processes exchange that method's records
(a baseline is matched to every process's D3 records), and at the end rank 0 writes every record into OUTPUT in the
order one process would have (method by method, example by example) and removes the rank files. `--resume` reads
OUTPUT and any rank files, whatever the number of processes that wrote them.

    methods.py        the methods and the plan of each
    results_file.py   the JSONL file of finished examples, resumable, merged across processes
    summary.py        the summary of a run's records
    runner.py         Benchmark: a run prepared, run method by method, summarized
    distributed.py    the process group of a data-parallel run (accelerate launch, torchrun)
"""

from d3cli.evaluation.bench.methods import (  # noqa: F401
    BRIDGED,
    DEFAULT_METHODS,
    METHOD_KINDS,
    METHODS,
    MethodKind,
    MethodRun,
    bench_alphas,
    default_methods,
    matched_linear,
    matched_static,
    method_runs,
    plan_for_run,
)
from d3cli.evaluation.bench.results_file import (  # noqa: F401
    ResultsFile,
    merged_order,
    prompt_digest,
    rank_file,
    rank_files,
    record_key,
)
from d3cli.evaluation.bench.runner import Benchmark, Progress, encode_examples, run_identity, run_method  # noqa: F401
from d3cli.evaluation.bench.summary import by_subtask, fidelity_columns, summarize  # noqa: F401
