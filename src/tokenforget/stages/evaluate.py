"""Evaluate: what `tokenforget eval` measures on one model, through lm-evaluation-harness, and the gold NLL.

lm-evaluation-harness (`lm_eval`) runs every benchmark that needs prompting, generation or choices: it gets
the already-loaded model wrapped in its `HFLM`, and task definitions over local files that ship with this
package (`tokenforget/stages/tasks/*.yaml`, scored by `tasks/utils.py`), so nothing needs the Hub:

- `gsm8k`: GSM8K-format JSONL, greedy generation, exact match on the final number (`tokenforget_gsm8k`);
- `mc:<file stem>`: multiple-choice JSONL (`question`, `choices`, `label`), log-likelihood accuracy;
- `distinct_1`, `distinct_2`, `entropy_2`: diversity of sampled answers to the GSM8K questions;
- any standard lm-evaluation-harness task name (`eval.tasks`), whose data comes from the Hub.

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

import copy
import json
import logging
import math
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from tokenforget.config import RunConfig
from tokenforget.config.data import DataConfig
from tokenforget.errors import ConfigError
from tokenforget.config.evaluation import EvalConfig
from tokenforget.diversity import MEASURES
from tokenforget.metrics import answer_accuracy, extract_answer, result_spans, token_weighted_mean
from tokenforget.model.batching import forward_ce, length_grouped_batches, pad_batch
from tokenforget.model.loading import BaseModel, autocast, device
from tokenforget.runfolder import RunFolderError
from tokenforget.stages import data as data_mod

TASK_DIR = Path(__file__).parent / "tasks"
GSM8K_TASK, MC_TASK, DIVERSITY_TASK = "tokenforget_gsm8k", "tokenforget_multiple_choice", "tokenforget_diversity"
PRIMARY_METRICS = ("acc_norm,none", "acc,none", "exact_match,flexible-extract", "exact_match,strict-match", "exact_match,none")
"""For a standard task, the first of these that it reports is its headline number."""


# ---------------------------------------------------------------- task configs


def task_config(name: str) -> dict[str, Any]:
    """A shipped task definition as a dict (its `!function` entries resolved), ready for overrides."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return copy.deepcopy(load_yaml(TASK_DIR / f"{name}.yaml", resolve_func=True))


def _with_source(cfg: dict[str, Any], source: str, hub_config: Optional[str], fewshot: Optional[str] = None) -> dict[str, Any]:
    """Point a task at a local JSONL file (the `json` builder) or at a Hub data set."""
    if data_mod.is_local_file(source):
        files = {"test": str(Path(source).expanduser().resolve())}
        if fewshot:
            files["train"] = str(Path(fewshot).expanduser().resolve())
        return {**cfg, "dataset_kwargs": {"data_files": files}}
    out = {**cfg, "dataset_path": source, "dataset_name": hub_config, "test_split": "test"}
    out.pop("dataset_kwargs", None)
    return out


def gsm8k_task(ecfg: EvalConfig, source: str) -> dict[str, Any]:
    local = data_mod.is_local_file(source)
    if ecfg.num_fewshot and local and not ecfg.fewshot_path:
        raise ConfigError("config field 'eval.fewshot_path': needed when eval.num_fewshot > 0 (a GSM8K-format file)")
    cfg = _with_source(task_config(GSM8K_TASK), source, ecfg.gsm8k_hub_config, ecfg.fewshot_path if ecfg.num_fewshot else None)
    if not ecfg.num_fewshot:
        cfg.pop("fewshot_split", None)
    cfg["num_fewshot"] = ecfg.num_fewshot
    cfg["generation_kwargs"] = {**cfg["generation_kwargs"], "max_gen_toks": ecfg.max_new_tokens}
    return cfg


def multiple_choice_task(path: str) -> dict[str, Any]:
    if not data_mod.is_local_file(path):
        raise ConfigError(f"config field 'eval.multiple_choice': file '{path}' not found")
    return {**_with_source(task_config(MC_TASK), path, None), "task": f"{MC_TASK}_{_stem(path)}"}


def diversity_task(ecfg: EvalConfig, source: str) -> dict[str, Any]:
    cfg = _with_source(task_config(DIVERSITY_TASK), source, ecfg.gsm8k_hub_config)
    k = ecfg.diversity_samples
    cfg["repeats"] = k
    cfg["filter_list"] = [{"name": "samples", "filter": [{"function": "take_first_k", "k": k}]}]
    gen = {"do_sample": True, "temperature": ecfg.temperature, "top_p": ecfg.top_p, "max_gen_toks": ecfg.max_new_tokens}
    cfg["generation_kwargs"] = {**cfg["generation_kwargs"], **gen}
    return cfg


def _stem(path: str) -> str:
    return re.sub(r"\W+", "_", Path(path).stem)


# ---------------------------------------------------------------- running lm_eval


def hf_lm(model: torch.nn.Module, tokenizer: Any, ecfg: EvalConfig, bf16: bool) -> Any:
    """lm_eval's `HFLM` around an already-loaded model (bf16 as autocast, as in training)."""
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    return HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=ecfg.batch_size,
        mixed_precision_dtype=torch.bfloat16 if bf16 else None,
    )


def standard_tasks(ecfg: EvalConfig) -> list[Any]:
    """`eval.tasks` as lm-eval takes them: a name, or `{task: name, num_fewshot: n}` where `eval.task_shots` sets
    its shots (lm-eval loads the named task's config and overrides that one field)."""
    return [{"task": t, "num_fewshot": ecfg.task_shots[t]} if t in ecfg.task_shots else t for t in ecfg.tasks]


def unknown_tasks(names: Sequence[str]) -> list[str]:
    """The names among `names` that neither the installed lm-eval nor our `tasks/` folder defines (offline: the
    task index is built from YAML files, no data is read)."""
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    known = set(TaskManager(include_path=str(TASK_DIR)).all_tasks)
    return [n for n in names if n not in known]


def _quiet_lm_eval() -> None:
    """lm_eval warns about every pre-loaded model and every `limit`; both are how we use it."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def run_harness(
    lm: Any, tasks: list[Any], ecfg: EvalConfig, limit: Optional[int], system_prompt: Optional[str], seed: int
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` over task names and task config dicts; returns its results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    standard = any(isinstance(t, str) for t in tasks)  # indexing lm_eval's own tasks takes ~30 s
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=standard)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        apply_chat_template=ecfg.chat_template,
        fewshot_as_multiturn=ecfg.chat_template,
        system_instruction=system_prompt,
        bootstrap_iters=1000,  # only for metrics without a closed-form stderr; ours are means
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def _entry(value: Any, stderr: Any, n: int, metric: str, higher: Optional[bool], kind: str) -> dict[str, Any]:
    def num(x: Any) -> float:
        return float(x) if isinstance(x, (int, float)) else float("nan")

    return {"value": num(value), "stderr": num(stderr), "n": n, "metric": metric, "higher_is_better": higher, "kind": kind}


def harness_benchmarks(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One entry per benchmark from lm_eval's results dict."""
    out: dict[str, dict[str, Any]] = {}
    for task, metrics in results["results"].items():
        n = int(results["n-samples"][task]["effective"])
        higher = results.get("higher_is_better", {}).get(task, {})
        if task == GSM8K_TASK:
            out["gsm8k"] = _entry(metrics["exact_match,none"], metrics["exact_match_stderr,none"], n, "exact_match", True, "accuracy")
        elif task == DIVERSITY_TASK:
            for name in MEASURES:
                out[name] = _entry(metrics[f"{name},samples"], metrics[f"{name}_stderr,samples"], n, name, True, "diversity")
        elif task.startswith(MC_TASK):
            out["mc:" + task[len(MC_TASK) + 1 :]] = _entry(metrics["acc,none"], metrics["acc_stderr,none"], n, "acc", True, "accuracy")
        else:
            key = next((k for k in PRIMARY_METRICS if k in metrics), None) or _first_metric(metrics)
            name = key.split(",")[0]
            kind = "accuracy" if name in ("acc", "acc_norm", "exact_match") else "other"
            out[task] = _entry(metrics[key], metrics.get(key.replace(",", "_stderr,", 1)), n, key, higher.get(name), kind)
    return out


def _first_metric(metrics: dict[str, Any]) -> str:
    return next(k for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float)))


def generations(results: dict[str, Any], task: str, how_many: int = 3) -> list[Any]:
    """The first few model outputs lm_eval logged for a task (for people reading the results)."""
    return [s["filtered_resps"][0] for s in results.get("samples", {}).get(task, [])[:how_many]]


# ---------------------------------------------------------------- gold NLL


def nll_benchmarks(
    model: torch.nn.Module, tokenizer: Any, records: list[data_mod.Record], data_cfg: DataConfig, batch_size: int,
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
        out[name] = {**_entry(mean.value, mean.stderr, mean.n, metric, False, "nll"), "tokens": mean.tokens,
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
    source = data_mod.gsm8k_source(ecfg)
    if ecfg.gsm8k_nll and source:
        out["gsm8k_nll"] = (source, ecfg.gsm8k_hub_config)
    for path in ecfg.nll:
        out[f"nll:{_stem(path)}"] = (path, None)
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
    lm = lm or hf_lm(model, tokenizer, ecfg, bf16)
    source = data_mod.gsm8k_source(ecfg)
    out: dict[str, Any] = {"benchmarks": {}, "lm_eval": {}, "samples": {}}
    greedy: list[Any] = ([gsm8k_task(ecfg, source)] if source else [])
    greedy += [multiple_choice_task(p) for p in ecfg.multiple_choice] + standard_tasks(ecfg)
    passes = [(greedy, ecfg.limit)]
    if ecfg.diversity_prompts and source:
        passes.append(([diversity_task(ecfg, source)], ecfg.diversity_prompts))
    for tasks, limit in passes:
        if not tasks:
            continue
        log(f"[eval] lm-evaluation-harness: {', '.join(t if isinstance(t, str) else t['task'] for t in tasks)}")
        res = run_harness(lm, tasks, ecfg, limit, data_cfg.system_prompt, seed)
        out["benchmarks"].update(harness_benchmarks(res))
        out["lm_eval"].update(_plain(res["results"]))
        out["samples"].update({t: generations(res, t) for t in res["results"]})
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
) -> list[str]:
    """Greedy completions of chat prompts (left-padded batches)."""
    model.eval()
    dev = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[i : i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            with autocast(bf16):
                gen = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outs



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
    """What an evaluation of held-out answers needs of a run (`tokenforget.run.pipeline.Run` has it): its config (the
    data's rendering, the model's settings), its base model (tokenizer, frozen weights) and its precision."""

    cfg: RunConfig
    base: BaseModel
    bf16: bool


def evaluate_models(
    run: EvaluatedRun, stages: dict[str, Path], test_path: Path, max_new_tokens: int, log: Callable[[str], None],
    cache: Optional[Path] = None,
) -> dict[str, Any]:
    """Answer accuracy and gold NLL on a held-out file, for the base model and each trained stage. With `cache`, a
    model's results are kept there (`<name>-<key>.json`, the key made of the model's stage fingerprint, the file's
    content and the generation length) and reused, so a rerun that adds settings evaluates only the new ones."""
    tok = run.base.tokenizer
    records = data_mod.load_records(run.cfg.data, str(test_path))
    cols, _ = data_mod.tokenize_records(tok, records, run.cfg.data)
    prompts = [r.messages[:-1] for r in records]
    golds = [r.messages[-1]["content"] for r in records]
    models: dict[str, Any] = {}
    for name in ["base", *stages]:
        kept = cache / f"{name}-{eval_key(run, stages.get(name), test_path, max_new_tokens)}.json" if cache else None
        if kept is not None and kept.is_file():
            log(f"[evaluate] {name}: reusing {kept}")
            models[name] = json.loads(kept.read_text())
            continue
        model = run.base.frozen().to(device()) if name == "base" else load_trained(stages[name])
        log(f"[evaluate] {name}: generating {len(prompts)} answers")
        preds = generate(model, tok, prompts, max_new_tokens, batch_size=GENERATE_BATCH, bf16=run.bf16)
        acc = answer_accuracy(preds, golds)
        nll = gold_nll(model, cols["input_ids"], cols["response_mask"], 16, run.bf16, tok.pad_token_id)
        models[name] = {"accuracy": acc.accuracy, "stderr": acc.stderr, "n": acc.n, "gold_nll": nll, "sample": preds[0],
                        "correct": acc.correct, "answers": [extract_answer(p) for p in preds]}  # what each one said
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(models[name]))
        del model
    return {"models": models}


def eval_key(run: EvaluatedRun, stage: Optional[Path], test_path: Path, max_new_tokens: int) -> str:
    """What a held-out evaluation depends on: the model (its train stage's fingerprint, or the base model's
    settings), the held-out file's content, the answer length and the precision."""
    from tokenforget.config import to_dict
    from tokenforget.runfolder import STAGE_FILE, file_digest, fingerprint, stable_view

    model = json.loads((stage / STAGE_FILE).read_text())["fingerprint"] if stage else stable_view("model", to_dict(run.cfg.model))
    return fingerprint("held-out", model, file_digest(str(test_path)), max_new_tokens, run.bf16)
