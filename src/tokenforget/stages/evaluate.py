"""Evaluate: what `tokenforget eval` measures on one model (lm-evaluation-harness's tasks, `stages.harness`, and
the gold NLL), the demo's held-out answers (generated, graded, with the gold NLL), and the stage `eval-<model>`.

The held-out NLL of gold responses (`gsm8k_nll`, `nll:<file stem>`) is computed by
`response_nll` below instead: it reads any SFT-format file through `tokenforget.stages.data`, so
the gold responses are rendered and tokenized exactly as in training (chat template, system prompt,
multi-turn conversations with every assistant turn scored), and it is reported per token in nats, the unit
of the training loss. lm_eval's loglikelihood requests would see a single prompt/continuation pair and
report per-document or per-byte figures.

Each benchmark becomes one entry: `{"value", "stderr", "n", "metric", "higher_is_better", "kind"}` with
kind `accuracy` (averaged into `average` by `tokenforget compare`), `nll` or `diversity`.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from tokenforget.config import RunConfig, to_dict
from tokenforget.config.data import DataConfig
from tokenforget.config.evaluation import EvalConfig
from tokenforget.metrics import answer_accuracy, answer_settled, extract_answer, result_spans, token_weighted_mean
from tokenforget.model.batching import forward_ce, length_grouped_batches, pad_batch
from tokenforget.model.loading import BaseModel, autocast, device
from tokenforget.training.objectives import OBJECTIVES
from tokenforget.runfolder import (
    STAGE_FILE, RunFolder, RunFolderError, file_digest, fingerprint, folder_digest, release_memory, stable_view,
)
from tokenforget.stages import data as data_mod, harness
from tokenforget.stages.labels_in_data import Record
from tokenforget.stages.stage import Arg, PlanInputs, Stage, StagePlan, StageRun, no_needs

# ---------------------------------------------------------------- gold NLL


def nll_benchmarks(
    model: torch.nn.Module, tokenizer: Any, records: list[Record], data_cfg: DataConfig, batch_size: int,
    bf16: bool, results: bool = False,
) -> dict[str, dict[str, Any]]:
    """Token-weighted NLL (nats per response token) of the gold responses, with examples as the units: `all`
    over every response token and, with `results`, `result` over the result tokens only (`evaluate.result_spans`:
    the numbers after `=` and `####`), both from one forward pass. The result spans travel as the records'
    marked spans, which tokenization maps to tokens exactly as it maps corrupted spans."""
    if results:
        records = [replace(r, corrupt_spans=result_spans(r.messages[-1]["content"])) for r in records]
    cols, _ = data_mod.tokenize_records(tokenizer, records, data_cfg)
    masks = {"all": cols["response_mask"], **({"result": cols["corrupt"]} if results else {})}
    sums = masked_nll(model, cols["input_ids"], list(masks.values()), batch_size, bf16, tokenizer.pad_token_id)
    out = {}
    for (name, _), (s, c) in zip(masks.items(), sums):
        mean = token_weighted_mean(s, c)
        metric = "nll_per_token" if name == "all" else "nll_per_result_token"
        # per example, so that two models can be compared question by question (compare's paired stderr)
        out[name] = {**harness.entry(mean.value, mean.stderr, mean.n, metric, False, "nll"), "tokens": mean.tokens,
                     "per_example": {"nll_sum": s.tolist(), "tokens": c.tolist()}}
    return out


def eval_data_config(data_cfg: DataConfig, limit: Optional[int], hub_config: Optional[str] = None) -> DataConfig:
    """How a held-out file is read: the training data's rendering (chat template, system prompt,
    max_length), but the file's own format and columns, its first `limit` records, split `test` on the Hub."""
    return replace(
        data_cfg, path=None, split="test", hub_config=hub_config, format="auto", field_map={}, limit=limit,
        hub_fallback=None, corrupt_fraction=0.0, sample=None,
    )


def nll_sources(ecfg: EvalConfig) -> dict[str, tuple[str, Optional[str]]]:
    """Benchmark name -> (data source, Hub config), for every held-out NLL the config asks for."""
    out: dict[str, tuple[str, Optional[str]]] = {}
    source = gsm8k_source(ecfg)
    if ecfg.gsm8k_nll and source:
        out["gsm8k_nll"] = (source, ecfg.gsm8k_hub_config)
    for path in ecfg.nll:
        out[f"nll:{harness.stem(path)}"] = (path, None)
    return out


# ---------------------------------------------------------------- one model


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    ecfg: EvalConfig,
    data_cfg: DataConfig,
    bf16: bool,
    seed: int,
    log: Callable[[str], None] = print,
    lm: Any = None,
) -> dict[str, Any]:
    """Every benchmark `ecfg` asks for, on one loaded model.

    Returns `{"benchmarks": {name: entry}, "lm_eval": {task: lm_eval's metrics}, "samples": {task: the
    first outputs}, "wall_s": seconds}`. `lm` replaces the `HFLM` wrapper (tests pass a scripted one).
    """
    t0 = time.time()
    model.eval()
    lm = lm or (harness.hf_lm(model, tokenizer, ecfg, bf16) if harness.needs_harness(ecfg) else None)
    source = gsm8k_source(ecfg)
    out: dict[str, Any] = {"benchmarks": {}, "lm_eval": {}, "samples": {}}
    greedy: list[Any] = ([harness.gsm8k_task(ecfg, source)] if source else [])
    greedy += [harness.multiple_choice_task(p) for p in ecfg.multiple_choice] + harness.standard_tasks(ecfg)
    passes = [(greedy, ecfg.limit)]
    if ecfg.diversity_prompts and source:
        passes.append(([harness.diversity_task(ecfg, source)], ecfg.diversity_prompts))
    for tasks, limit in passes:
        if not tasks:
            continue
        log(f"[eval] lm-evaluation-harness: {', '.join(t if isinstance(t, str) else t['task'] for t in tasks)}")
        res = harness.run_harness(lm, tasks, ecfg, limit, data_cfg.system_prompt, seed)
        out["benchmarks"].update(harness.harness_benchmarks(res))
        out["lm_eval"].update(_plain(res["results"]))
        out["samples"].update({t: harness.generations(res, t) for t in res["results"]})
    for name, (src, hub_config) in nll_sources(ecfg).items():
        log(f"[eval] gold NLL: {name} ({src})")
        rendering = eval_data_config(data_cfg, ecfg.limit, hub_config)
        records = data_mod.load_records(rendering, src)
        entries = nll_benchmarks(model, tokenizer, records, rendering, ecfg.batch_size, bf16, ecfg.result_nll)
        out["benchmarks"][name] = entries["all"]
        if "result" in entries:
            out["benchmarks"][f"result_{name}"] = entries["result"]
    out["wall_s"] = time.time() - t0
    return out


def _plain(x: Any) -> Any:
    """lm_eval's results with only JSON-friendly values (nan and 'N/A' become None)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x if isinstance(x, (int, float, str, bool)) or x is None else str(x)


def results_table(results: dict[str, Any]) -> str:
    """One model's benchmarks as a text table."""
    from tokenforget.text_table import format_table

    rows = [
        [name, e["metric"], f"{e['value']:.4f} ± {e['stderr']:.4f}", e["n"]]
        for name, e in results["benchmarks"].items()
    ]
    return format_table(["benchmark", "metric", "value ± stderr", "n"], rows)


def load_model_folder(folder: Path, base: Any) -> torch.nn.Module:
    """A merged model (`config.json`), a LoRA adapter on the base (`adapter_config.json`, `base` a
    `models.BaseModel`), or a train stage folder (its `model/`, else its `adapter/`)."""
    from transformers import AutoModelForCausalLM

    for sub in ("model", "adapter"):
        if (folder / sub).is_dir():
            return load_model_folder(folder / sub, base)
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base.fresh(), str(folder)).merge_and_unload()
    if (folder / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    raise RunFolderError(f"eval.checkpoint: '{folder}' holds no model (config.json) and no LoRA adapter")


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int,
    bf16: bool,
    progress: str = "",
) -> list[str]:
    """Greedy completions of chat prompts, in left-padded batches of similar length. A row stops once its final
    answer is settled (`metrics.answer_settled`): what follows could not change the answer it is graded on, and a
    batch is as long as its longest row. `progress`: a name for a progress bar over the batches (none if empty)."""
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    model.eval()
    dev = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less left padding in each batch
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outs: list[str] = [""] * len(texts)
    try:
        for i in tqdm(range(0, len(order), batch_size), desc=f"[evaluate] {progress}", unit="batch", disable=not progress):
            rows = order[i : i + batch_size]
            enc = tokenizer([texts[j] for j in rows], return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            settled = StoppingCriteriaList([AnswerSettled(tokenizer, enc["input_ids"].shape[1])])
            with autocast(bf16):
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, stopping_criteria=settled)
            for j, text in zip(rows, tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)):
                outs[j] = text
    finally:
        tokenizer.padding_side = side
    return outs


class AnswerSettled:
    """A `generate` stopping criterion, per row: True once the row's completion has a settled final answer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int) -> None:
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        new = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([answer_settled(t) for t in new], dtype=torch.bool, device=input_ids.device)


def response_nll(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    response_masks: Sequence[Sequence[int]],
    batch_size: int,
    bf16: bool,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per example: (sum of the NLL in nats over its response tokens, how many response tokens)."""
    return masked_nll(model, input_ids, [response_masks], batch_size, bf16, pad_id)[0]



@torch.no_grad()
def masked_nll(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    mask_sets: Sequence[Sequence[Sequence[int]]],
    batch_size: int,
    bf16: bool,
    pad_id: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each set of per-example 0/1 masks: per example (sum of the NLL in nats over its masked tokens, how
    many), all from one forward pass (the first set's tokens are scored; every later mask must lie inside it)."""
    model.eval()
    dev = next(model.parameters()).device
    out = [(np.zeros(len(input_ids)), np.zeros(len(input_ids))) for _ in mask_sets]
    for batch in length_grouped_batches([len(s) for s in input_ids], batch_size):
        ids, attn = pad_batch([input_ids[i] for i in batch], pad_id)
        resp, _ = pad_batch([mask_sets[0][i] for i in batch], 0)
        ce = forward_ce(model, ids.to(dev), attn.to(dev), bf16, resp.to(dev)).cpu()  # (B, T), 0 off-response
        for (sums, counts), masks in zip(out, mask_sets):
            m, _ = pad_batch([masks[i] for i in batch], 0)
            sums[batch] = (ce * m).sum(1).double().numpy()
            counts[batch] = m.sum(1).numpy()
    return out



def gold_nll(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    response_masks: Sequence[Sequence[int]],
    batch_size: int,
    bf16: bool,
    pad_id: int = 0,
) -> float:
    """Mean per-token NLL (nats) of the gold response tokens, weighted by token."""
    sums, counts = response_nll(model, input_ids, response_masks, batch_size, bf16, pad_id)
    return float(sums.sum() / max(counts.sum(), 1))


def load_trained(stage: Path) -> torch.nn.Module:
    """The merged model a train stage saved."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(stage / "model"), dtype=torch.float32).to(device())



GENERATE_BATCH = 64  # prompts per generate call: the demo's 48 held-out problems at once (at 16, its evaluation took 42 s a model)



class EvaluatedRun(Protocol):
    """What an evaluation of held-out answers needs of a run (`tokenforget.pipeline.resolver.Run` has it): its config (the
    data's rendering, the model's settings), its base model (tokenizer, frozen weights), its precision and its folder
    (each model's results a stage there)."""

    cfg: RunConfig
    base: BaseModel
    bf16: bool
    folder: RunFolder


def evaluate_models(
    run: EvaluatedRun, stages: dict[str, Path], test_path: Path, max_new_tokens: int, log: Callable[[str], None],
    with_base: bool = True, nll_problems: Optional[int] = None,
) -> dict[str, Any]:
    """Answer accuracy and gold NLL on a held-out file, for each trained stage and (`with_base`) the base model; the
    gold NLL over the first `nll_problems` problems only when given (a token mean: its first few thousand tokens
    settle it, and its forward costs a third of an evaluation). Each model's results are a stage of the run folder
    (`held_out_stage`), reused while its fingerprint holds (`eval_key`: the model's stage fingerprint, the file's
    content, the generation length, the NLL's problems), so a rerun that adds settings evaluates only the new ones."""
    tok = run.base.tokenizer
    records = data_mod.load_records(run.cfg.data, str(test_path))
    cols, _ = data_mod.tokenize_records(tok, records, run.cfg.data)
    prompts = [r.messages[:-1] for r in records]
    golds = [r.messages[-1]["content"] for r in records]
    nll_n = len(records) if nll_problems is None else min(nll_problems, len(records))

    def evaluate_one(name: str) -> dict[str, Any]:
        model = run.base.frozen().to(device()) if name == "base" else load_trained(stages[name])
        log(f"[evaluate] {name}: generating {len(prompts)} answers")
        started = time.time()
        preds = generate(model, tok, prompts, max_new_tokens, batch_size=GENERATE_BATCH, bf16=run.bf16, progress=name)
        acc = answer_accuracy(preds, golds)
        nll = gold_nll(model, cols["input_ids"][:nll_n], cols["response_mask"][:nll_n], 16, run.bf16, tok.pad_token_id)
        first = f" (first {nll_n} problems)" if nll_n < len(records) else ""
        log(f"[evaluate] {name}: accuracy {acc.accuracy:.3f} on {acc.n} problems, gold NLL {nll:.4f} nats/token{first}, "
            f"in {time.time() - started:.0f} s")
        return {"accuracy": acc.accuracy, "stderr": acc.stderr, "n": acc.n, "gold_nll": nll, "nll_n": nll_n,
                "sample": preds[0], "correct": acc.correct, "answers": [extract_answer(p) for p in preds]}

    def commit(results: dict[str, Any], d: Path) -> dict[str, Any]:
        (d / HELD_OUT_FILE).write_text(json.dumps(results))
        return {"accuracy": results["accuracy"], "n": results["n"]}

    models: dict[str, Any] = {}
    for name in [*(["base"] if with_base else []), *stages]:
        key = eval_key(run, stages.get(name), test_path, max_new_tokens, nll_n, len(records))
        stage = held_out_stage(run.folder.root, stages.get(name), test_path)
        done = run.folder.ensure(stage, key, functools.partial(evaluate_one, name), commit)
        models[name] = json.loads((done / HELD_OUT_FILE).read_text())
    return {"models": models}


HELD_OUT_FILE = "held_out.json"


def held_out_stage(root: Path, trained: Optional[Path], test_path: Path) -> str:
    """The stage name of one model's results on one held-out file: `held-out-<file>-<model>`, the model the train
    stage's path under the run folder (`variant-x.train-ignore-e2-t1`) or `base`: every setting, epoch count and
    training seed of a grid keeps its own."""
    model = "base" if trained is None else ".".join(trained.resolve().relative_to(root.resolve()).parts)
    return f"held-out-{test_path.stem}-{model}"


def eval_key(run: EvaluatedRun, stage: Optional[Path], test_path: Path, max_new_tokens: int, nll_n: int, n: int) -> str:
    """What a held-out evaluation depends on: the model (its train stage's fingerprint, or the base model's
    settings), the held-out file's content, the answer length, the precision, and the gold NLL's problems when they
    are fewer than the file's `n` (a key without them is the whole file's: the caches made before the cut stay)."""
    from tokenforget.config import to_dict
    from tokenforget.runfolder import STAGE_FILE, file_digest, fingerprint, stable_view

    model = json.loads((stage / STAGE_FILE).read_text())["fingerprint"] if stage else stable_view("model", to_dict(run.cfg.model))
    subset = () if nll_n >= n else (f"nll-first-{nll_n}",)
    return fingerprint("held-out", model, file_digest(str(test_path)), max_new_tokens, run.bf16, *subset)


def gsm8k_source(ecfg: EvalConfig) -> Optional[str]:
    """The GSM8K test data: `eval.gsm8k`, or its Hub fallback when the local file is absent."""
    return data_mod.resolve_source(ecfg.gsm8k, ecfg.gsm8k_fallback) if ecfg.gsm8k else None


# ---------------------------------------------------------------- the stage: eval-<model>


def _eval_target(run: StageRun, target: Optional[str]) -> tuple[str, str, Callable[[], torch.nn.Module]]:
    """(stage suffix, fingerprint of the model, loader) for an eval target."""
    if target in (None, "base"):
        return "base", fingerprint("base", stable_view("model", to_dict(run.cfg.model))), run.base.frozen
    trained = (*OBJECTIVES, *run.cfg.compare.variants)  # names of train stages
    stage = run.folder.stage_dir(f"train-{target}") if target in trained else Path(str(target)).expanduser()
    if not stage.is_dir():
        hint = f"; train it first: tokenforget train --train.objective.mode {target}" if target in trained else ""
        raise RunFolderError(f"eval.checkpoint: '{stage}' does not exist{hint}")
    record = stage / STAGE_FILE
    model_fp = json.loads(record.read_text())["fingerprint"] if record.is_file() else fingerprint("folder", folder_digest(stage))
    name = str(target) if target in trained else stage.resolve().name
    return name, model_fp, lambda: load_model_folder(stage, run.base)


def _fingerprint(run: StageRun, target: Arg) -> str:
    """An evaluation's: the model's fingerprint, the eval settings, how examples are rendered, every file read."""
    c, model_fp = run.cfg, _eval_target(run, target)[1]  # type: ignore[arg-type]
    ec = {k: v for k, v in stable_view("eval", to_dict(c.eval)).items() if k != "checkpoint"}
    rendering = {k: getattr(c.data, k) for k in ("max_length", "chat_template", "system_prompt")}
    sources = [file_digest(s) for s in (gsm8k_source(c.eval), c.eval.fewshot_path)]
    extra = [file_digest(p) for p in (*c.eval.nll, *c.eval.multiple_choice)]
    return fingerprint("eval", model_fp, ec, rendering, sources, extra, c.seed, run.bf16)


def _make(run: StageRun, target: Arg) -> dict[str, Any]:
    """Evaluate a model with `cfg.eval`; stage `eval-<name>`. `target`: None or `base` = the base model; a mode or
    variant name = the finished stage `train-<name>` of this folder; anything else = a folder with a merged model,
    a LoRA adapter or a train stage. Reused while the model (its stage fingerprint) and the eval settings are the
    same."""
    name, _model_fp, load = _eval_target(run, target)  # type: ignore[arg-type]
    stage = f"eval-{name}"
    harness.check_installed(run.cfg.eval)  # before any model loads

    def build() -> dict[str, Any]:  # every rank evaluates (lm-eval shares the work out)
        run.log(f"[{stage}] evaluating")
        model = load().to(device())
        results = evaluate_model(model, run.base.tokenizer, run.cfg.eval, run.cfg.data, run.bf16, run.cfg.seed, run.log)
        del model
        release_memory()
        return results

    def commit(results: dict[str, Any], d: Path) -> dict[str, Any]:
        (d / "results.json").write_text(json.dumps(results, indent=2))
        return {"target": target or "base"}

    out = run.folder.ensure(stage, run.fp("eval", target), build, commit, every_rank=True)
    return json.loads((out / "results.json").read_text())


def _plan(run: StageRun, target: Arg, fp: str, reuse: bool, _inputs: PlanInputs) -> StagePlan:
    return StagePlan(f"eval-{target or 'base'}", fp, reuse, 0, 0, f"evaluate on {', '.join(run.cfg.eval.tasks) or 'no task'}", 0.0)


STAGES = (Stage("eval", no_needs, _fingerprint, _make, _plan, folder=lambda target: f"eval-{target or 'base'}"),)
