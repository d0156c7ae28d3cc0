"""Shared predicates for expectations: ``expect=predict.gomp_fork_hang`` and friends.

Each takes a :class:`~repro.harness.spec.Build` and returns ``(outcomes, reason)``; the
reason is shown next to the verdict, so it says which facts of the build decided it.
"""

from __future__ import annotations

from repro.harness.spec import Build, Outcome


def gomp_fork_hang(build: Build) -> tuple[Outcome, str]:
    """A child forked after the parent ran parallel intra-op work hangs in its next parallel op.

    GNU libgomp keeps the parent's worker-thread pool in its state; after fork() those threads
    do not exist in the child, and the child's next parallel region waits for them forever
    (GCC bug 52303/60035 class; LLVM/Intel runtimes reset their pools at fork). It needs: Linux
    (fork), torch's intra-op backend on libgomp, and more than one intra-op thread, so that a
    team was really started in the parent.
    """
    facts = f"backend={build['torch_parallel_backend']}, openmp={sorted(build.openmp) or 'none'}, intra_threads={build.intra_threads}, system={build['system']}"
    if not build.linux:
        return Outcome.PASS, f"no libgomp fork hang off Linux ({facts})"
    if not build.gomp:
        return Outcome.PASS, f"intra-op pool is not libgomp ({facts})"
    if build.intra_threads <= 1:
        return Outcome.PASS, f"one intra-op thread: libgomp never starts a team ({facts})"
    return Outcome.HANG, f"libgomp pool started in the parent, dead in the forked child ({facts})"


def fork_available(build: Build) -> str | None:
    """A skip reason where os.fork does not exist (``requires=`` of fork variants)."""
    system = build["system"]
    if system and system not in ("Linux", "Darwin") and not str(system).endswith("BSD"):
        return f"no os.fork on {system}"
    return None


def needs_cuda(build: Build) -> str | None:
    return None if build.cuda else "needs a CUDA device"
