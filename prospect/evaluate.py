"""`python -m prospect.evaluate predictions=PATH [eval=offline|proassist] [eval.key=value ...]`

Re-scores a run's predictions.json (no VLM is loaded): prints a metrics table (per subset and
overall) with the stream's measured scores (teacher-forced ref_ppl / ref_top1, speak_auc) where the file
carries them, the 95% interval over conversations of the overall F1, ref_ppl, ref_top1 and speak_auc, a note
for each measurement the file lacks (older files: one line, the rest still evaluates); writes metrics.json
beside the predictions file, with the structure of `prospect.eval.evaluate_predictions`. Bad input: one
line `prospect.evaluate: error: ...`, exit 2. A file that is not a predictions document is refused that way
whatever its shape or size (`prospect.eval.read_predictions`): its raw bytes are checked in chunks before it is
parsed (at most 256 MB, or PROSPECT_MAX_PREDICTIONS_MB; UTF-8; one JSON object; at most 64 levels of
brackets; a first key other than "schema"), then its shape, naming the first thing wrong (e.g. `FILE:
conversations[3]: a string, not an object`). A metrics.json that finds no room on the disk: one line, exit 3,
no half file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra._internal.utils import get_args_parser
from omegaconf import DictConfig, OmegaConf

from prospect.signals import EXIT_DISK_FULL, EXIT_USAGE, DiskFull
from prospect.eval import DISABLED, EvalSetupError, PredictionsError, evaluate_predictions, read_predictions
from prospect.eval.stream_scores import REF_PPL, REF_TOP1, SPEAK_AUC
from prospect.eval.metrics import (
    F1, JACCARD_INDEX, MISSING_RATE, NUM_CONVERSATIONS, NUM_MATCHED, NUM_MISMATCHED, NUM_MISSED, NUM_REDUNDANT,
    PRECISION, RECALL, REDUNDANT_RATE, SEMANTIC_SCORE, TIME_DIFF,
)
from prospect.declared_keys import check_declared_keys, declared_config
from prospect.tracking.job_files import write_json
from prospect.validation import CONF_DIR, ConfigError, check_eval, check_group_choice, compose_job, quote_path_overrides

PROG = "prospect.evaluate"
CONFIG_NAME = "evaluate"
METRICS_FILE = "metrics.json"

# (header, metric, format) of the printed table
TABLE_COLUMNS = (
    ("convs", NUM_CONVERSATIONS, "d"),
    ("P", PRECISION, ".3f"),
    ("R", RECALL, ".3f"),
    ("F1", F1, ".3f"),
    ("jaccard", JACCARD_INDEX, ".3f"),
    ("miss", MISSING_RATE, ".3f"),
    ("redund", REDUNDANT_RATE, ".3f"),
    ("sem", SEMANTIC_SCORE, ".3f"),
    ("tdiff_s", TIME_DIFF, ".2f"),
    ("correct", NUM_MATCHED, "d"),
    ("wrong", NUM_MISMATCHED, "d"),
    ("missed", NUM_MISSED, "d"),
    ("redundant", NUM_REDUNDANT, "d"),
    ("ref_ppl", REF_PPL, ".3f"),
    ("ref_top1", REF_TOP1, ".3f"),
    ("speak_auc", SPEAK_AUC, ".3f"),
)
INTERVALS_SHOWN = (F1, REF_PPL, REF_TOP1, SPEAK_AUC)


class UsageError(ValueError):
    """A bad command line or input; str() is one line."""


def predictions_path(value: str) -> Path:
    """The predictions file: PATH itself, or PATH/predictions.json when PATH is a run directory."""
    path = Path(str(value)).expanduser()
    return path / "predictions.json" if path.is_dir() else path


def evaluate_file(cfg: DictConfig) -> tuple[dict, Path]:
    """Score cfg.predictions with cfg.eval and write metrics.json beside it: (result, metrics path)."""
    if OmegaConf.is_missing(cfg, "predictions") or cfg.predictions is None:
        raise UsageError("predictions: missing; pass predictions=PATH (a run's predictions.json)")
    if cfg.eval.get("name") == DISABLED:
        raise UsageError("eval=none: scoring is disabled; choose eval=offline or eval=proassist")
    check_eval(cfg.eval)
    path = predictions_path(cfg.predictions)
    document = read_predictions(path)
    result = evaluate_predictions(document, cfg.eval)
    target = path.parent / METRICS_FILE
    write_json(target, result)  # atomic; a full disk raises DiskFull and leaves no half file
    return result, target


def format_table(result: dict) -> str:
    """Plain aligned text: one row per subset, then overall."""
    rows = [("subset", *(header for header, _, _ in TABLE_COLUMNS))]
    named = [*result["per_subset"].items(), ("overall", result["metrics"])]
    for name, metrics in named:
        rows.append((name, *(format(metrics[key], spec) if key in metrics else "-" for _, key, spec in TABLE_COLUMNS)))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    for name in INTERVALS_SHOWN:
        found = result.get("intervals", {}).get(name)
        if found:
            shown = (f"[{found['low']:.3f}, {found['high']:.3f}]" if "low" in found else found["reason"])
            lines.append(f"{name} {result['metrics'][name]:.3f}, {found.get('confidence', 0.95):.0%} interval over "
                         f"{found['conversations']} conversations: {shown}")
    for entry in result["skipped"]:
        lines.append(f"skipped {entry['id']}: {entry['error']}")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _fail(error: Exception) -> None:
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> None:
    try:
        result, target = evaluate_file(cfg)
    except (UsageError, ConfigError, PredictionsError, EvalSetupError) as error:
        _fail(error)
    except DiskFull as error:
        print(f"{PROG}: error: {error} (nothing was written)", file=sys.stderr)
        sys.exit(EXIT_DISK_FULL)
    print(format_table(result))
    print(f"wrote {target}")


def check_command_line(argv: list[str]) -> None:
    """One-line errors before Hydra starts: unparsable overrides, unknown eval option or key, sweeps."""
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        raise UsageError(f"cannot parse the command line: {' '.join(argv)}") from None
    if args.help or args.hydra_help or args.info or args.shell_completion or args.cfg:
        return
    if args.multirun:
        raise UsageError("-m/--multirun is not supported; evaluate one predictions file per command")
    overrides = [o for o in args.overrides if not o.lstrip("~+").startswith("hydra")]
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "eval":
            check_group_choice("eval", value)
    cfg, choices = compose_job(overrides, CONFIG_NAME)
    check_declared_keys(cfg, declared_config(choices, CONFIG_NAME, CONF_DIR))  # + keys no YAML declares


def cli() -> None:
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])
    try:
        check_command_line(sys.argv[1:])
    except (UsageError, ConfigError) as error:
        _fail(error)
    main()


if __name__ == "__main__":
    cli()
