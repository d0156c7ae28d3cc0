"""The claims under test, one id each. Scenarios name the claims they bear on
(``@scenario(claims=...)``); docs/HAZARDS.md gives each claim a verdict per build.

The claim texts paraphrase the seed documents (shared/seeds/NNN_*.txt); they are the
seeds' hypotheses, not facts.
"""

from __future__ import annotations

CLAIMS: dict[str, dict[str, str]] = {
    "000-mutex-harmless": {
        "seed": "000",
        "claim": "`[mutex.cc : 452] RAW: Lock blocking` at torch.load of a fully pickled model is harmless PyTorch C++ initialisation.",
    },
    "000-weights-only": {
        "seed": "000",
        "claim": "Loading a fully pickled model with weights_only=False is a safe way to ship a split part (implicit in the seed's code).",
    },
    "001-nested-import-deadlock": {
        "seed": "001",
        "claim": "Importing torch/transformers again in nested model modules deadlocks under Anaconda MKL.",
    },
    "001-lazy-import-fix": {
        "seed": "001",
        "claim": "Lazy imports (import one family only when asked) fix the import deadlock and start faster.",
    },
    "001-mkl-sequential-fix": {
        "seed": "001",
        "claim": "MKL_THREADING_LAYER=SEQUENTIAL (with MKL_DYNAMIC=FALSE) fixes the MKL import deadlock.",
    },
    "002-fork-deadlock": {
        "seed": "002",
        "claim": "Forking a server after the parent used torch deadlocks the child; spawn fixes it.",
    },
    "002-manager-queue-cost": {
        "seed": "002",
        "claim": "multiprocessing Manager().Queue() costs 10-50x native IPC; Unix sockets (multiprocessing.connection) are cheap.",
    },
    "002-server-overhead": {
        "seed": "002",
        "claim": "A spawn + Unix-socket inference server adds about 1.03x over a direct call, and 4 workers batch to ~3.5 at ~255 req/s.",
    },
    "002-cuda-fork": {
        "seed": "002",
        "claim": "CUDA cannot be re-initialised in a forked child; a spawned server holds the GPU.",
    },
    "003-dataloader-fork-deadlock": {
        "seed": "003",
        "claim": "DataLoader num_workers>0 with fork deadlocks (next to CUDA); num_workers=0 is the fix.",
    },
    "003-queue-full": {
        "seed": "003",
        "claim": "When the model stage stalls, the upstream bounded queue fills and blocks the producer for 60 s.",
    },
    "003-thread-env-fix": {
        "seed": "003",
        "claim": "Thread environment variables (OMP_NUM_THREADS=1 etc.) prevent the worker deadlock.",
    },
    "003-zombies": {
        "seed": "003",
        "claim": "Worker deadlocks leave zombie (defunct) processes behind.",
    },
    "004-placeholder-lock": {
        "seed": "004",
        "claim": "Holding the manager lock only to insert a placeholder keeps the event loop responsive while a load takes seconds.",
    },
    "004-duplicate-refused": {
        "seed": "004",
        "claim": "A second load of the same model id is refused while the first is loading or loaded.",
    },
}


def claim_text(claim_id: str) -> str:
    return CLAIMS[claim_id]["claim"]
