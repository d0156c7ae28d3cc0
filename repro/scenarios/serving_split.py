"""Seed 000's split path for real: the trunk on a TrunkServer over loopback TCP, bottom and top
in the client.

* ``tiny`` (fix): tiny GPT-2 and Qwen2 checkpoints, one server hosting both trunks; greedy
  generation through :class:`SplitClient` (left-padded batch, eos handling) equals the full
  transformers model's ``generate``, token for token.
* ``gpt2_small`` (load): the GPT-2-small shape (12 layers, 768 wide, random weights), split at
  (2, 10). Figures: wall time of greedy generation of ``new_tokens`` tokens after a
  ``prompt``-token prompt, batch 1, median of ``repeats``: the monolithic model
  (transformers ``generate``), the split model in one process (``greedy_generate``, local
  trunk), and the split model with the trunk over loopback, in rounds (order rotating); ratio
  split-over-loopback / monolithic, the median of the rounds' ratios (target <= 1.2x). Also the per-token round trip to the trunk server.
"""

from __future__ import annotations

import statistics
import time

from repro.harness.spec import fix, load, scenario


def _server(models, ctx, threads=None):
    from splitlearn.serving.trunk_server import TrunkServer

    srv = TrunkServer(models, start_timeout=min(300.0, max(30.0, ctx.remaining() - 30)), num_threads=threads)
    ctx.stage("start trunk server")
    srv.start()
    ctx.record(server_start_s=srv.info["start_seconds"], server_models=srv.info["models"])
    return srv


@scenario(
    name="serving_split",
    seed="000",
    claims=(),
    timeout=600,
    variants=[
        fix("tiny", params={"families": {"gpt2": [1, 3], "qwen2": [2, 4]}, "new_tokens": 10}),
        load(
            "gpt2_small",
            markers=("slow",),
            params={"split": [2, 10], "prompt": 32, "new_tokens": 32, "repeats": 5, "threads": 1},
            quick={"repeats": 2},
        ),
    ],
)
def serving_split(ctx):
    import torch
    from transformers import AutoModelForCausalLM

    from fixtures.models import gpt2_small_dir, tiny_model_dir
    from fixtures.reference import padded_batch
    from splitlearn.generate import greedy_generate
    from splitlearn.serving.split_client import SplitClient

    p = ctx.params
    if ctx.variant == "tiny":
        dirs = {f: tiny_model_dir(f) for f in p["families"]}
        srv = _server(
            {
                f: {"model_type": f, "path": str(d), "split_points": s}
                for (f, s), d in zip(p["families"].items(), dirs.values(), strict=True)
            },
            ctx,
        )
        try:
            for fam, split in p["families"].items():
                ctx.stage(f"{fam}: split over loopback vs full model")
                full = AutoModelForCausalLM.from_pretrained(str(dirs[fam]), local_files_only=True).eval()
                ids, mask = padded_batch(seed=5, batch=3, length=8, pad_lengths=[0, 3, 1], side="left", vocab=250)
                eos = int(full.config.eos_token_id)
                with torch.inference_mode():
                    ref = full.generate(
                        ids,
                        attention_mask=mask,
                        max_new_tokens=p["new_tokens"],
                        do_sample=False,
                        eos_token_id=eos,
                        pad_token_id=0,
                    )
                with SplitClient.connect(
                    srv.address, srv.authkey, fam, model_type=fam, path=dirs[fam], split_points=tuple(split)
                ) as sc:
                    got = sc.generate(ids, p["new_tokens"], attention_mask=mask, eos_token_id=eos, pad_token_id=0)
                    ctx.record(**{f"{fam}_remote_calls": sc.calls})
                ctx.check(torch.equal(got, ref), f"{fam}: split generation differs from the full model:\n{got}\n{ref}")
                ctx.observe(f"{fam}: {tuple(got.shape)} tokens equal to the full model's generate")
        finally:
            srv.close()
        return

    # -- gpt2_small: figures ---------------------------------------------------------------------
    torch.set_num_threads(p["threads"])
    ctx.stage("build/locate the GPT-2-small checkpoint")
    d = gpt2_small_dir()
    s1, s2 = p["split"]
    srv = _server(
        {"gpt2-small": {"model_type": "gpt2", "path": str(d), "split_points": [s1, s2]}}, ctx, threads=p["threads"]
    )
    try:
        ctx.stage("load monolithic model")
        full = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True).eval()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 50000, (1, p["prompt"]), generator=gen)
        n = p["new_tokens"]

        ctx.stage("load local split parts and connect")
        from splitlearn.factory import ModelFactory

        _, trunk, _ = ModelFactory.create_split_models("gpt2", d, s1, s2, parts=("trunk",))
        with SplitClient.connect(
            srv.address, srv.authkey, "gpt2-small", model_type="gpt2", path=d, split_points=(s1, s2)
        ) as sc:
            runs = {
                "monolithic": lambda: full.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                ),
                "split_local": lambda: greedy_generate(sc.bottom, trunk, sc.top, ids, n),
                "split_loopback": lambda: sc.generate(ids, n),
            }
            ctx.stage("warm-up")
            with torch.inference_mode():
                full.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
            greedy_generate(sc.bottom, trunk, sc.top, ids, 2)
            sc.generate(ids, 2)
            times: dict[str, list[float]] = {k: [] for k in runs}
            outs: dict[str, object] = {}
            names = list(runs)
            for r in range(p["repeats"]):
                # interleaved, the order rotating, so that load from elsewhere and whatever the
                # first of a round pays hit all three alike
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    fn = runs[name]
                    ctx.stage(f"repeat {r}: {name}")
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        outs[name] = fn()
                    times[name].append(time.perf_counter() - t0)
                ctx.record(runs_s={k: [round(x, 4) for x in v] for k, v in times.items()})
            ctx.stage("trunk round trip")
            rt = []
            for _ in range(50):
                t0 = time.perf_counter()
                sc.trunk.ping()
                rt.append(time.perf_counter() - t0)
            ctx.record(ping_ms_median=round(1e3 * statistics.median(rt), 4))
        t_mono, t_local, t_remote = (
            statistics.median(times[k]) for k in ("monolithic", "split_local", "split_loopback")
        )
        ref, local, remote = outs["monolithic"], outs["split_local"], outs["split_loopback"]
        ctx.record(monolithic_s=round(t_mono, 4), split_local_s=round(t_local, 4), split_loopback_s=round(t_remote, 4))
        ctx.check(
            torch.equal(local, ref[:, : local.shape[1]]),
            "split (local trunk) tokens differ from the monolithic model's",
        )
        ctx.check(torch.equal(remote, local), "split over loopback tokens differ from the local split")
        def side_by_side(num: str, den: str) -> float:  # the median of the rounds' ratios
            return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))

        ratio = side_by_side("split_loopback", "monolithic")
        ctx.record(
            loopback_over_monolithic=round(ratio, 4),
            local_split_over_monolithic=round(side_by_side("split_local", "monolithic"), 4),
            loopback_over_local_split=round(side_by_side("split_loopback", "split_local"), 4),
            method=(
                f"GPT-2-small shape (random weights), split {p['split']}, batch 1, prompt {p['prompt']}, {n} new tokens, "
                f"torch threads={p['threads']} in client and server (same machine), median of {p['repeats']} interleaved rounds' ratios (order rotating) after warm-up; "
                "monolithic = transformers generate(do_sample=False)"
            ),
            targets={
                "split_loopback_over_monolithic_le_1.2": {"value": round(ratio, 4), "target": 1.2, "met": ratio <= 1.2}
            },
        )
        ctx.observe(
            f"monolithic {t_mono:.3f}s, local split {t_local:.3f}s, loopback split {t_remote:.3f}s: {ratio:.3f}x"
        )
    finally:
        srv.close()
        ctx.record(server_exitcode=srv.last_exitcode)
