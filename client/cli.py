"""graft: from a folder of images to a served head in three commands.

    graft upload my_images/ --name textiles       # class folders, a .zip or a .csv of path,label
    graft train textiles --head textiles          # live progress until the job ends
    graft train textiles --head textiles --objective balanced_accuracy   # every class counts the same
    graft predict textiles photos/                # a table; --json / --csv for pipes
    graft audit textiles                          # images whose label is probably wrong
    graft examples textiles                       # each image's file name, client id and label
    graft suggest textiles --head textiles        # unlabelled images worth labelling next, and why
    graft predict textiles photos/ --min-score 0.8 --coverage 0.9   # "unknown" below 0.8; 90 % label sets
    graft shadow textiles 3                       # version 3 answers beside the served one, unseen
    graft compare textiles                        # how often they agree, and on what they differ
    graft feedback PREDICTION_ID hole             # the true label of an image predicted earlier
    graft monitor textiles                        # live traffic per window: drifting or ok

Server, transport and key: --url / --api-key, else GRAFT_URL / GRAFT_API_KEY, else the
config file (client/config.py). Exit codes: 0 success, 1 the server refused or failed
(its code and message on one line), 2 a usage error, 3 the server cannot be reached,
4 the job ended without a head (failed or cancelled), 130 interrupted.
"""

import argparse
import csv
import json
import signal
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from client import config, connect, sources
from client.base import Client
from client.errors import GraftError, Unavailable
from client.http_client import HttpClient
from client.models import (
    CLASS_WEIGHTINGS,
    EXPORT_FORMATS,
    OBJECTIVES,
    RESULTS_FORMATS,
    SCALINGS,
    SUGGESTION_STRATEGIES,
    TRAINING_KINDS,
    WEBHOOK_EVENTS,
    BatchPrediction,
    Head,
    HeadComparison,
    HeadMonitoring,
    HeadPrediction,
    ImagePrediction,
    Job,
    MonitorWindow,
    PredictOptions,
)
from client.progress import ProgressBar, human_bytes
from client.retry import RetryPolicy

EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_JOB_FAILED, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


UNKNOWN = "unknown"  # the label shown where a head abstains (its top score is below --min-score)
SHADOW_MARK = "(shadow)"  # in the aliases column of `graft heads`


class UsageError(Exception):
    """A mistake in the command line or the files it names; the message says what to do."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.api_key:
        print(
            "graft: warning: --api-key shows the key to every user of this machine (process list) and keeps it in "
            "your shell history; set GRAFT_API_KEY or put api_key in the config file (chmod 600) instead",
            file=sys.stderr,
        )
    try:
        settings = config.load(args.url, args.api_key, args.timeout, args.ca_file)
        retry = RetryPolicy(attempts=max(args.retries, 0) + 1)
        with connect(
            settings.url, settings.api_key, timeout_s=settings.timeout_s, retry=retry, ca_file=settings.ca_file
        ) as graft:
            return args.run(graft, args) or 0
    except (UsageError, ValueError, OSError) as exc:
        print(f"graft: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Unavailable as exc:
        print(f"graft: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except GraftError as exc:
        print(f"graft: {exc}{_hint(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("graft: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _hint(exc: GraftError) -> str:
    if exc.code == "unauthenticated":
        return " (give a valid key: --api-key or GRAFT_API_KEY)"
    if exc.code == "resource_exhausted":
        return " (the server is busy or a quota is reached; try again later)"
    return ""


# Commands ---------------------------------------------------------------------------------------------------------


def upload(graft: Client, args: argparse.Namespace) -> int:
    source = Path(args.source)
    if not source.exists():
        raise UsageError(f"{source} does not exist: give a class-folder directory, a .zip or a .csv of path,label")
    if source.is_dir():
        total_images, total_bytes = _totals(sources.from_directory(source))
    elif source.suffix.lower() == ".csv":
        total_images, total_bytes = _totals(sources.from_csv(source))
    elif source.suffix.lower() == ".zip":
        total_images, total_bytes = sources.zip_image_count(source), source.stat().st_size
    else:
        raise UsageError(f"{source}: give a class-folder directory, a .zip or a .csv of path,label")
    bar = ProgressBar(total_bytes)

    def progress(sent: int, images: int) -> None:
        bar.update(
            sent,
            f"{images}/{total_images} images  {human_bytes(sent)}/{human_bytes(total_bytes)}",
            force=images == total_images,
        )

    try:
        dataset = graft.create_dataset(source, args.name or source.stem, progress=progress)
    finally:
        bar.close()
    if args.json:
        print(dataset.model_dump_json())
    else:
        counts = ", ".join(f"{label} {count}" for label, count in sorted(dataset.examples_per_class.items()))
        unlabelled = f", {dataset.unlabelled_example_count} unlabelled" if dataset.unlabelled_example_count else ""
        print(
            f"{dataset.name}  {dataset.display_name!r}: {dataset.example_count} images, "
            f"{len(dataset.classes)} classes ({counts}){unlabelled}"
        )
    return 0


def _totals(examples: list[sources.Example]) -> tuple[int, int]:
    return len(examples), sum(e.size or 0 for e in examples)


def train(graft: Client, args: argparse.Namespace) -> int:
    dataset = _dataset_name(graft, args.dataset)
    hyperparams = json.loads(args.hyperparams) if args.hyperparams else None
    job = graft.train(
        dataset,
        args.head,
        kind=args.kind,
        backbone=args.backbone,
        hyperparams=hyperparams,
        time_budget_s=args.time_budget,
        objective=args.objective,
        class_weighting=args.class_weighting,
        scaling=args.scaling,
    )
    print(f"{job.name}: training head {args.head!r} on {dataset}", file=sys.stderr)
    if args.no_wait:
        print(job.name)
        return 0
    job = _follow(graft, job)
    if args.json:
        print(job.model_dump_json())
    elif job.state == "succeeded":
        accuracy = job.metrics.get("accuracy")
        score = f", hold-out accuracy {accuracy:.3f}" if isinstance(accuracy, int | float) else ""
        print(f"{job.head_version}: {job.state}{score}")
    else:
        print(f"{job.name}: {job.state}{': ' + job.error if job.error else ''}")
    return 0 if job.state == "succeeded" else EXIT_JOB_FAILED


def _dataset_name(graft: Client, given: str) -> str:
    """A dataset by resource name, id or display name (the newest of that name)."""
    if given.startswith(("datasets/", "ds_")):
        return given if given.startswith("datasets/") else f"datasets/{given}"
    matches = [d for d in graft.list_datasets() if d.display_name == given]
    if not matches:
        raise UsageError(f"no dataset named {given!r}: see `graft datasets`, or upload one with `graft upload`")
    return max(matches, key=lambda d: d.create_time).name


def _follow(graft: Client, job: Job) -> Job:
    """Watch until the job ends; Ctrl-C asks whether to cancel it (on a pipe it cancels)."""
    bar = ProgressBar(1.0)
    best: list[float] = []

    def show(update: Job) -> None:
        accuracy = update.metrics.get("val_accuracy")
        if update.phase == "search" and isinstance(accuracy, int | float) and "done" in update.message:
            best.append(accuracy)
        if update.done and isinstance(update.metrics.get("accuracy"), int | float):
            best.append(update.metrics["accuracy"])  # the chosen head's: updates in between may have been skipped
        best_text = f"  best hold-out accuracy {max(best):.3f}" if best else ""
        bar.update(update.progress, f"{update.state} {update.phase}: {update.message}{best_text}", force=update.done)

    while True:
        try:
            job = graft.wait(job.name, on_update=show)
            bar.close()
            return job
        except KeyboardInterrupt:
            bar.close()
            if _confirm(f"cancel {job.name}? [y/N] "):
                graft.cancel_job(job.name)
                print(f"{job.name}: cancelling", file=sys.stderr)
                signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C leaves at once
            bar = ProgressBar(1.0)


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return True
    try:
        return input(question).strip().lower() in ("y", "yes")
    except (EOFError, KeyboardInterrupt):
        return True


def predict(graft: Client, args: argparse.Namespace) -> int:
    files = list(_image_files([Path(p) for p in args.files]))
    if not files:
        raise UsageError("no image files given: name files or a directory of images")
    heads = args.head.split(",")
    options = {name: getattr(args, name) for name in PredictOptions.model_fields}
    predictions = graft.predict(files, heads, batch_size=args.batch_size, concurrency=args.concurrency, **options)
    # Columns for --min-score / --coverage / --include-shadow only when asked for: scripts reading the plain CSV
    # keep working (prediction_id comes last).
    extra = (["abstained"] if args.min_score else []) + (["prediction_set"] if args.coverage else [])
    extra += ["shadow_version", "shadow_label", "shadow_score"] if args.include_shadow else []
    if args.json:
        for path, prediction in zip(files, predictions, strict=True):
            print(json.dumps({"file": str(path)} | prediction.model_dump(exclude_none=True)))
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["file", "head", "version", "rank", "label", "score", *extra, "prediction_id"])
        writer.writerows(_prediction_rows(files, predictions, extra))
    else:  # the best label per head ("unknown" where it abstains), its prediction set, its shadow's, the id
        _table(
            [
                "file",
                "head",
                "label",
                "score",
                *(["set"] if args.coverage else []),
                *(["shadow"] if args.include_shadow else []),
                "prediction id",
            ],
            [
                [
                    str(path),
                    f"{head.head}@{head.version}",
                    _best(head),
                    f"{head.top[0].score:.3f}",
                    *([" ".join(head.prediction_set or [])] if args.coverage else []),
                    *([_shadow_answer(head.shadow)] if args.include_shadow else []),
                    prediction.prediction_id or "-",
                ]
                for path, prediction in zip(files, predictions, strict=True)
                for head in prediction.heads
            ],
        )
    return 0


def _best(head: HeadPrediction) -> str:
    return UNKNOWN if head.abstained else head.top[0].label


def _shadow_answer(shadow: HeadPrediction | None) -> str:
    """'@3 stain 0.912': the shadow version's best label, or '-' where the head has no shadow."""
    return f"@{shadow.version} {_best(shadow)} {shadow.top[0].score:.3f}" if shadow and shadow.top else "-"


def _image_files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix.lower() in sources.IMAGE_SUFFIXES)
        elif path.is_file():
            yield path
        else:
            raise UsageError(f"{path} does not exist")


def _prediction_rows(files: list[Path], predictions: list[ImagePrediction], extra: list[str]) -> Iterator[list[Any]]:
    """file, head, version, rank, label, score, then the ``extra`` columns (abstained, prediction_set ';'-joined,
    the shadow's version, label and score at the same rank), then prediction_id."""
    for path, prediction in zip(files, predictions, strict=True):
        for head in prediction.heads:
            shadow = head.shadow
            for rank, top in enumerate(head.top, start=1):
                theirs = shadow.top[rank - 1] if shadow and rank <= len(shadow.top) else None
                more = {
                    "abstained": head.abstained,
                    "prediction_set": ";".join(head.prediction_set or []),
                    "shadow_version": shadow.version if shadow else "",
                    "shadow_label": theirs.label if theirs else "",
                    "shadow_score": theirs.score if theirs else "",
                }
                row = [str(path), head.head, head.version, rank, top.label, top.score, *(more[c] for c in extra)]
                yield [*row, prediction.prediction_id or ""]


def heads(graft: Client, args: argparse.Namespace) -> int:
    found = [graft.get_head(args.name)] if args.name else graft.list_heads()
    if args.json:
        for head in found:
            print(head.model_dump_json())
        return 0
    rows = []
    for head in found:
        aliases = {v: [a for a, n in head.aliases.items() if n == v and a != "latest"] for v in head.aliases.values()}
        for version in head.versions:
            accuracy = version.metrics.get("accuracy")
            rows.append(
                [
                    head.display,
                    str(version.version),
                    version.kind,
                    version.backbone,
                    str(len(version.classes)),
                    f"{accuracy:.3f}" if isinstance(accuracy, int | float) else "-",
                    ",".join([*aliases.get(version.version, []), *_shadow_mark(head, version.version)]) or "-",
                ]
            )
    _table(["head", "version", "kind", "backbone", "classes", "accuracy", "aliases"], rows)
    return 0


def _shadow_mark(head: Head, version: int) -> list[str]:
    """'(shadow)' beside the aliases of the version that shadows the head: in brackets, as no alias can be."""
    return [SHADOW_MARK] if version == head.shadow_version else []


def datasets(graft: Client, args: argparse.Namespace) -> int:
    found = graft.list_datasets()
    if args.json:
        for dataset in found:
            print(dataset.model_dump_json())
        return 0
    _table(
        ["dataset", "display name", "images", "classes", "created"],
        [
            [d.name, d.display_name, str(d.example_count), str(len(d.classes)), f"{d.create_time:%Y-%m-%d %H:%M}"]
            for d in found
        ],
    )
    return 0


def examples(graft: Client, args: argparse.Namespace) -> int:
    found = graft.list_examples(_dataset_name(graft, args.dataset))
    if args.json:
        for example in found:
            print(example.model_dump_json())
        return 0
    _table(
        ["file", "client id", "position", "label", "sha256"],
        [[e.display, e.client_id or "", str(e.index), e.label or "-", e.image_sha256[:12]] for e in found],
    )
    return 0


def suggest(graft: Client, args: argparse.Namespace) -> int:
    dataset = _dataset_name(graft, args.dataset)
    found = graft.suggest_examples(dataset, args.head, count=args.count, strategy=args.strategy, seed=args.seed)
    if args.json:
        print(found.model_dump_json())
        return 0
    print(
        f"{found.dataset}: {len(found.suggestions)} of {found.pool_size} unlabelled images to label next for "
        f"{found.head_version} ({found.strategy})"
    )
    if found.suggestions:
        print()
        _table(
            ["file", "client id", "position", "likeliest", "margin", "why"],
            [
                [
                    s.example.display,
                    s.example.client_id or "",
                    str(s.example.index),
                    " / ".join(f"{p.label} {p.score:.2f}" for p in s.likeliest),
                    f"{s.margin:.3f}",
                    s.reason,
                ]
                for s in found.suggestions
            ],
        )
    return 0


def label(graft: Client, args: argparse.Namespace) -> int:
    """One example's label (``--unlabel`` clears it), or a CSV of file,label rows (``--import``)."""
    dataset = _dataset_name(graft, args.dataset)
    if args.import_csv is not None:
        if args.example is not None or args.label is not None or args.unlabel:
            raise UsageError("give either EXAMPLE LABEL or --import labels.csv, not both")
        imported = graft.import_labels(dataset, Path(args.import_csv).read_bytes())
        print(
            f"{imported.row_count} rows applied; {imported.dataset.name}: "
            f"{imported.dataset.labelled_example_count} labelled in {len(imported.dataset.classes)} classes, "
            f"{imported.dataset.unlabelled_example_count} unlabelled"
        )
        return 0
    if args.example is None or (args.label is None) == (not args.unlabel):
        raise UsageError("give EXAMPLE and LABEL (or EXAMPLE --unlabel), or --import labels.csv")
    example = graft.label_example(dataset, args.example, None if args.unlabel else args.label)
    print(f"{example.name}  {example.display}: {example.label if example.label is not None else '(unlabelled)'}")
    return 0


def audit(graft: Client, args: argparse.Namespace) -> int:
    dataset = _dataset_name(graft, args.dataset)
    found = graft.audit_dataset(
        dataset,
        backbone=args.backbone,
        max_suspects=args.max_suspects,
        max_duplicates=args.max_duplicates,
        duplicate_similarity=args.similarity,
    )
    if args.json:
        print(found.model_dump_json())
        return 0
    print(
        f"{found.dataset}: {found.example_count} images on {found.backbone} ({found.folds} folds): "
        f"{found.suspect_count} probably mislabelled, {found.duplicate_count} near-duplicate pairs "
        "under different labels"
    )
    if found.suspects:
        print()
        _table(
            ["file", "client id", "sha256", "label", "suggested", "p(label)", "p(suggested)"],
            [
                [
                    s.example.display,
                    s.example.client_id or "",
                    s.example.image_sha256[:12],
                    s.example.label,
                    s.suggested_label,
                    f"{s.label_score:.3f}",
                    f"{s.suggested_score:.3f}",
                ]
                for s in found.suspects
            ],
        )
    if found.duplicates:
        print()
        _table(
            ["file", "label", "file", "label", "similarity"],
            [
                [
                    d.first.display,
                    d.first.label,
                    d.second.display,
                    d.second.label,
                    "identical" if d.identical else f"{d.similarity:.4f}",
                ]
                for d in found.duplicates
            ],
        )
    return 0


def alias(graft: Client, args: argparse.Namespace) -> int:
    if args.remove:
        graft.remove_alias(args.head, args.alias)
        print(f"removed {args.head}:{args.alias}")
        return 0
    if args.version is None:
        raise UsageError("give the version the alias points at (graft alias HEAD ALIAS VERSION), or --remove")
    head = graft.set_alias(args.head, args.alias, args.version)
    print(f"{head.display}:{args.alias} -> version {head.aliases[args.alias]}")
    return 0


def shadow(graft: Client, args: argparse.Namespace) -> int:
    if args.clear:
        if args.version is not None:
            raise UsageError("give a version to shadow, or --clear, not both")
        head = graft.clear_shadow(args.head)
        print(f"{head.display}: no shadow (its comparisons are kept: graft compare {head.display})")
        return 0
    if args.version is None:
        raise UsageError("give the version that shadows the head (graft shadow HEAD VERSION), or --clear")
    head = graft.set_shadow(args.head, args.version)
    print(
        f"{head.display}: version {head.shadow_version} answers every prediction beside the served one, unseen by "
        f"callers; graft compare {head.display} shows how they differ"
    )
    return 0


def compare(graft: Client, args: argparse.Namespace) -> int:
    found = graft.compare(args.head)
    if args.json:
        print(found.model_dump_json())
        return 0
    if not found.comparisons:
        print(f"{found.head}: no shadow has answered yet (attach one: graft shadow {found.head} VERSION)")
        return 0
    for number, comparison in enumerate(found.comparisons):
        if number:
            print()
        _print_comparison(found.head, comparison)
    return 0


def _print_comparison(head: str, c: HeadComparison) -> None:
    print(f"{head}: shadow version {c.shadow_version} beside served version {c.served_version}")
    agreement = "-" if c.agreement is None else _percent(c.agreement)
    difference = "-" if c.mean_top_score_difference is None else f"{c.mean_top_score_difference:+.3f}"
    print(
        f"  {c.compared} images compared: agreement {agreement}, "
        f"mean top-score difference {difference} (shadow - served)"
    )
    if c.labelled:
        print(
            f"  {c.labelled} with a reported label: accuracy served {_percent(c.served_accuracy)}, "
            f"shadow {_percent(c.shadow_accuracy)}"
        )
    if c.confusion:
        print()
        _table(
            ["served \\ shadow", *c.labels],
            [[label, *(str(count) for count in row)] for label, row in zip(c.labels, c.confusion, strict=False)],
        )


def feedback(graft: Client, args: argparse.Namespace) -> int:
    found = graft.report_feedback(args.prediction_id, args.label)
    if args.json:
        print(found.model_dump_json())
        return 0
    verdicts = []
    for head in found.heads:
        verdict = f"{head.head}@{head.version} {'right' if head.correct else 'wrong'}"
        if head.shadow_version is not None and head.shadow_correct is not None:
            verdict += f", shadow @{head.shadow_version} {'right' if head.shadow_correct else 'wrong'}"
        verdicts.append(verdict)
    print(f"{found.prediction_id}: {found.label!r} recorded; {'; '.join(verdicts) or 'no head to score'}")
    return 0


def monitor(graft: Client, args: argparse.Namespace) -> int:
    name, _, ref = args.head.partition("@")
    name, _, alias = name.partition(":")
    version = _version_number(graft, name, ref or alias) if ref or alias else None
    if args.clear_drift:
        if version is None:
            raise UsageError("name the version whose drift you accept: graft monitor HEAD@VERSION --clear-drift")
        found = graft.clear_drift(name, version)
    else:
        found = graft.monitor(name, version)
    if args.json:
        print(found.model_dump_json())
        return 0
    _print_monitoring(found, args.last)
    return 0


def _version_number(graft: Client, head: str, ref: str) -> int:
    """A version number from '3' or an alias ('prod'), which only the head knows."""
    if ref.isdigit():
        return int(ref)
    try:
        return graft.get_head(head).version(ref).version
    except KeyError as exc:
        raise UsageError(str(exc).strip("'\"")) from None


def _print_monitoring(found: HeadMonitoring, last: int) -> None:
    since = f" since {_when(found.drifting_since)}" if found.drifting_since else ""
    print(f"{found.head}@{found.version}: {found.status or 'unknown'}{since}")
    if not found.reference:
        print(f"  no OOD scores or drift tests: {found.reference_note or 'the version has no monitoring reference'}")
    if found.evidence is not None:
        print(f"  evidence: the window ending {_when(found.evidence.end_time)}: drift {_drift_text(found.evidence)}")
    if found.live.labelled:
        print(f"  live accuracy {_percent(found.live.accuracy)} on {found.live.labelled} reported labels")
    if not found.windows:
        print("  no window of predictions closed yet")
        return
    ood = [w.ood_rate for w in found.windows if w.ood_rate is not None]
    drift = [w.drift.statistic / w.drift.threshold for w in found.windows if w.drift and w.drift.threshold > 0]
    if ood:
        print(f"  ood rate        {sparkline(ood)}  (per window, oldest first)")
    if drift:
        print(f"  drift/threshold {sparkline(drift)}")
    print()
    _table(
        ["end time", "predictions", "ood rate", "abstained", "label distance", "drift (statistic / threshold)"],
        [
            [
                _when(w.end_time),
                str(w.predictions),
                _percent(w.ood_rate),
                _percent(w.abstention_rate),
                "-" if w.label_distance is None else f"{w.label_distance:.3f}",
                _drift_text(w),
            ]
            for w in found.windows[-last:]
        ],
    )


def _drift_text(window: MonitorWindow) -> str:
    test = window.drift
    if test is None:
        return "-"
    return f"{test.statistic:.3g} / {test.threshold:.3g}{' drifting' if test.drifting else ''}"


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """One character per value, its height relative to the largest (all zero: the lowest)."""
    top = max(values, default=0.0)
    return "".join(
        SPARKS[min(len(SPARKS) - 1, int(v / top * (len(SPARKS) - 1) + 0.5)) if top > 0 else 0] for v in values
    )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _when(moment: datetime) -> str:
    return f"{moment.astimezone():%Y-%m-%d %H:%M:%S}"


def export(graft: Client, args: argparse.Namespace) -> int:
    additional = args.also.split(",") if args.also else []
    if additional and args.format == "safetensors":
        raise UsageError("--also needs a --format with the backbone in it: safetensors holds one head's weights")
    data = graft.export(args.head, args.format, additional)
    stem = "+".join(head.replace(":", "_").replace("@", "_") for head in [args.head, *additional])
    out = Path(args.output or f"{stem}.{args.format}")
    out.write_bytes(data)
    print(f"{out} ({human_bytes(len(data))}, {args.format})")
    return 0


REPORT_EXTRA = (
    "graft report draws with matplotlib, which is not installed: pip install 'graft-client[report]' "
    "(from graft's repository: pip install './client[report]')"
)


def report(graft: Client, args: argparse.Namespace) -> int:
    try:
        from client.report import draw  # matplotlib only for this command (the `report` extra)
    except ModuleNotFoundError as exc:
        if exc.name not in ("matplotlib", "numpy"):
            raise
        raise UsageError(REPORT_EXTRA) from None

    head = graft.get_head(args.head.split("@")[0].split(":")[0])
    ref = args.head.partition("@")[2] or args.head.partition(":")[2] or None
    try:
        number = head.version(ref).version
    except KeyError as exc:
        raise UsageError(str(exc).strip("'\"")) from None
    version = graft.get_head_version(head.display, number)  # the whole metrics: the head has their summaries
    draw(version, Path(args.output))
    print(f"{args.output}: {version.display}")
    return 0


def admin(graft: Client, args: argparse.Namespace) -> int:
    if not isinstance(graft, HttpClient):
        raise UsageError("admin commands use the HTTP door: give --url http(s)://HOST:PORT and the admin key")
    if args.admin_command == "create-tenant":
        tenant = graft.create_tenant(args.tenant)
        print(f"tenant {tenant.name} created")
    else:
        key = graft.create_key(args.tenant)
        print(key.secret)
        print(f"key {key.key_id} for tenant {key.tenant}: store it now, it is not shown again", file=sys.stderr)
    return 0


def webhooks(graft: Client, args: argparse.Namespace) -> int:
    """Register, list, test and delete webhook endpoints, and read one's delivery log."""
    if args.webhooks_command == "add":
        created = graft.create_webhook(args.endpoint, args.event, args.description)
        print(created.secret)
        print(
            f"{created.name}: {', '.join(created.event_types)} -> {created.url}; the line above is its signing "
            "secret: store it now, it is not shown again (verify deliveries with client.verify_webhook)",
            file=sys.stderr,
        )
    elif args.webhooks_command == "list":
        rows = [[w.name, ",".join(w.event_types), w.url, w.description] for w in graft.list_webhooks()]
        _table(["webhook", "events", "url", "description"], rows)
    elif args.webhooks_command == "delete":
        graft.delete_webhook(args.webhook)
        print(f"{_webhook_name(args.webhook)} deleted")
    elif args.webhooks_command == "test":
        delivery = graft.test_webhook(args.webhook)
        print(f"{delivery.name}: {delivery.event_type} queued")
    else:
        rows = [
            [
                d.name.rsplit("/", 1)[-1],
                d.event_type,
                d.state,
                str(d.attempts),
                "" if d.last_status_code is None else str(d.last_status_code),
                d.last_error or "",
                d.create_time.strftime("%Y-%m-%d %H:%M:%S"),
            ]
            for d in graft.list_webhook_deliveries(args.webhook)
        ]
        _table(["delivery", "event", "state", "attempts", "status", "error", "created"], rows)
    return 0


def _webhook_name(webhook: str) -> str:
    return webhook if webhook.startswith("webhooks/") else f"webhooks/{webhook}"


def batch(graft: Client, args: argparse.Namespace) -> int:
    """graft batch create|get|list|cancel|results: heads x a stored dataset, in the background."""
    if args.batch_command == "create":
        found = graft.predict_dataset(
            _batch_input(graft, args.dataset), args.heads.split(","), top_k=args.top_k, min_score=args.min_score
        )
        if args.wait:
            found = graft.wait_batch_prediction(found.name)
    elif args.batch_command == "get":
        found = graft.get_batch_prediction(args.name)
    elif args.batch_command == "cancel":
        found = graft.cancel_batch_prediction(args.name)
    elif args.batch_command == "results":
        data = graft.batch_prediction_results(args.name, args.format)
        if args.output:
            Path(args.output).write_bytes(data)
        else:
            sys.stdout.write(data.decode())
        return 0
    else:
        listed = graft.list_batch_predictions()
        if args.json:
            for item in listed:
                print(item.model_dump_json())
            return 0
        _table(["name", "state", "images", "heads", "created"], [_batch_row(b) for b in listed])
        return 0
    if args.json:
        print(found.model_dump_json())
    else:
        _table(["name", "state", "images", "heads", "created"], [_batch_row(found)])
        if found.error:
            print(f"error: {found.error}")
    return 0 if found.state != "failed" else 1


def _batch_input(graft: Client, given: str) -> str:
    """A stored dataset (name, id or display name), or a .zip or folder of images uploaded now as one (its images
    unlabelled at its root, or in class folders: a batch prediction answers every image, labelled or not)."""
    path = Path(given)
    if not (path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")):
        return _dataset_name(graft, given)
    dataset = graft.create_dataset(path, path.stem)
    print(f"{path}: uploaded as {dataset.name} ({dataset.example_count} images)", file=sys.stderr)
    return dataset.name


def _batch_row(found: BatchPrediction) -> list[str]:
    heads = ",".join(found.head_versions or found.spec.heads)
    created = found.create_time.strftime("%Y-%m-%d %H:%M:%S")
    return [found.name, found.state, f"{found.images_done}/{found.images_total}", heads, created]


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())


# The command line -------------------------------------------------------------------------------------------------


def _add_predict_options(sub: argparse.ArgumentParser) -> None:
    """One flag per field of PredictOptions (--top-k, --min-score, ...), with the model's default and bounds."""
    for name, field in PredictOptions.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        if field.annotation is bool:
            sub.add_argument(flag, action="store_true", help=field.description)
            continue
        bounds = _bounds(field)
        rule = f"{'a whole number' if field.annotation is int else 'a number'} {bounds}"
        default = "" if field.default is None else f"; default {field.default:g}"
        about = f"{field.description} ({bounds}{default})"
        sub.add_argument(flag, type=_option(name, rule), default=field.default, help=about)


def _bounds(field: FieldInfo) -> str:
    """The field's bounds as the model states them, e.g. '>= 1 and <= 1000'."""
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(
        f"{sign} {getattr(limit, key):g}"
        for limit in field.metadata
        for key, sign in signs.items()
        if hasattr(limit, key)
    )


def _option(name: str, rule: str) -> Callable[[str], Any]:
    """An argparse type for one prediction option: the model parses and checks it; the message states the rule."""

    def parse(text: str) -> Any:
        try:
            return getattr(PredictOptions.model_validate({name: text}), name)
        except ValidationError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graft",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--url",
        help="http(s)://HOST:PORT, grpc://HOST:PORT or grpcs://HOST:PORT (TLS) (env "
        f"GRAFT_URL; default {config.DEFAULT_URL})",
    )
    parser.add_argument(
        "--ca-file",
        help="PEM CA to trust for grpcs:// and https:// instead of the system's roots, "
        "for a private or self-signed certificate (env GRAFT_CA_FILE)",
    )
    parser.add_argument("--api-key", help="API key; visible in process lists: prefer env GRAFT_API_KEY")
    parser.add_argument("--timeout", type=float, help="seconds a call may take (env GRAFT_TIMEOUT_S; default 60)")
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="retries of a call the server refused for now (unavailable, or 429 with Retry-After); default 3",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, run: Callable[[Client, argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    sub = command("upload", upload, "upload a dataset: class folders (label/image.jpg), a .zip or a .csv of path,label")
    sub.add_argument("source")
    sub.add_argument("--name", help="display name (default: the folder or file name)")
    sub.add_argument("--json", action="store_true", help="print the dataset as JSON")

    sub = command("train", train, "train a head on a dataset and follow the job until it ends")
    sub.add_argument("dataset", help="datasets/ID, an id, or a display name (the newest)")
    sub.add_argument("--head", required=True, help="the head to create a version of")
    sub.add_argument(
        "--kind",
        choices=TRAINING_KINDS,
        help="default: the server's; the server's /docs describe each kind (schema TrainingKind)",
    )
    sub.add_argument("--time-budget", type=float, metavar="SECONDS", help="--kind auto only (default: the server's)")
    sub.add_argument("--backbone", help="a backbone, or 'auto' (default: the server's)")
    sub.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="what 'best' means to every choice graft makes (default: accuracy); balanced_accuracy counts every "
        "class the same",
    )
    sub.add_argument(
        "--class-weighting",
        choices=CLASS_WEIGHTINGS,
        help="kinds linear, mlp, finetune or auto: how much each example's loss counts (default: the server decides)",
    )
    sub.add_argument(
        "--scaling",
        choices=SCALINGS,
        help="kinds linear, mlp or auto: how the backbone's features are scaled (default: the server decides)",
    )
    sub.add_argument("--hyperparams", help="JSON overrides, e.g. '{\"epochs\": 10}'")
    sub.add_argument("--no-wait", action="store_true", help="print the job's name and return at once")
    sub.add_argument("--json", action="store_true", help="print the finished job as JSON")

    sub = command("predict", predict, "predict labels of image files (or directories) with one or more heads")
    sub.add_argument("head", help="HEAD, HEAD@3 or HEAD:alias; several separated by commas")
    sub.add_argument("files", nargs="+", metavar="FILE|DIR")
    _add_predict_options(sub)
    sub.add_argument("--batch-size", type=int, default=16, help="images per request")
    sub.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    output = sub.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per file")
    output.add_argument("--csv", action="store_true", help="file,head,version,rank,label,score rows")

    sub = command("heads", heads, "list heads with their versions, accuracy and aliases")
    sub.add_argument("name", nargs="?", help="one head only")
    sub.add_argument("--json", action="store_true")

    sub = command("datasets", datasets, "list datasets")
    sub.add_argument("--json", action="store_true")

    sub = command("examples", examples, "list a dataset's images: file name, client id, position, label")
    sub.add_argument("dataset", help="datasets/ID, an id, or a display name (the newest)")
    sub.add_argument("--json", action="store_true")

    sub = command("suggest", suggest, "rank a dataset's unlabelled images by what a label would teach a head")
    sub.add_argument("dataset", help="datasets/ID, an id, or a display name (the newest)")
    sub.add_argument("--head", required=True, help="the head version that judges them: name, name@3, name:alias")
    sub.add_argument("--count", type=int, default=0, help="images to suggest (default 20, at most 200)")
    sub.add_argument("--strategy", choices=SUGGESTION_STRATEGIES, help="default: diverse_margin")
    sub.add_argument("--seed", type=int, default=0, help="the same seed and data give the same answer")
    sub.add_argument("--json", action="store_true", help="print the suggestions as JSON")

    sub = command("label", label, "label a dataset's image (by client id or position), or import file,label rows")
    sub.add_argument("dataset", help="datasets/ID, an id, or a display name (the newest)")
    sub.add_argument("example", nargs="?", help="the example's client id or position (see `graft examples`)")
    sub.add_argument("label", nargs="?", help="its new label")
    sub.add_argument("--unlabel", action="store_true", help="clear the example's label (back to the pool)")
    sub.add_argument(
        "--import", dest="import_csv", metavar="CSV", help="rows of file,label (file name or client id): all or none"
    )

    sub = command("audit", audit, "find images whose label is probably wrong, and near-duplicates under two labels")
    sub.add_argument("dataset", help="datasets/ID, an id, or a display name (the newest)")
    sub.add_argument(
        "--backbone", help="the backbone whose features are audited (default: the server's GRAFT_DEFAULT_BACKBONE)"
    )
    sub.add_argument("--max-suspects", type=int, default=0, help="probable label errors to list (default 50)")
    sub.add_argument("--max-duplicates", type=int, default=0, help="duplicate pairs to list (default 50)")
    sub.add_argument(
        "--similarity", type=float, help="cosine similarity from which images are near-duplicates (default 0.98)"
    )
    sub.add_argument("--json", action="store_true", help="print the audit as JSON")

    sub = command("alias", alias, "point an alias (e.g. prod) at a head version, or remove it")
    sub.add_argument("head")
    sub.add_argument("alias")
    sub.add_argument("version", type=int, nargs="?")
    sub.add_argument("--remove", action="store_true")

    sub = command("shadow", shadow, "have a version answer every prediction beside the served one, or stop it")
    sub.add_argument("head")
    sub.add_argument("version", type=int, nargs="?", help="the version that shadows the head")
    sub.add_argument("--clear", action="store_true", help="stop shadowing (the comparisons are kept)")

    sub = command("compare", compare, "how a head's shadow versions answered beside the served one")
    sub.add_argument("head")
    sub.add_argument("--json", action="store_true", help="print the comparisons as JSON")

    sub = command("feedback", feedback, "report the true label of an image predicted earlier (once per prediction)")
    sub.add_argument("prediction_id", help="the prediction id graft predict printed")
    sub.add_argument("label")
    sub.add_argument("--json", action="store_true", help="print the answer as JSON")

    sub = command("monitor", monitor, "a head version's live traffic window by window, and whether it drifts")
    sub.add_argument("head", help="HEAD (the version served by default), HEAD@3 or HEAD:alias")
    sub.add_argument("--last", type=int, default=24, help="windows in the table, newest last (default 24)")
    sub.add_argument(
        "--clear-drift",
        action="store_true",
        help="HEAD@VERSION: its traffic was looked at and accepted: back to ok until the next drifting window",
    )
    sub.add_argument("--json", action="store_true", help="print the monitoring as JSON (every window kept)")

    about = (
        "download a head: safetensors weights, or backbone + head as one ONNX or torch.export (.pt2) "
        "file with class names, input transforms and provenance in its metadata"
    )
    sub = command("export", export, about)
    sub.add_argument("head", help="HEAD, HEAD@3 or HEAD:alias")
    sub.add_argument("--format", choices=EXPORT_FORMATS, default="safetensors")
    sub.add_argument("--also", metavar="HEADS", help="onnx/pt2: more heads on its backbone (a,b@2), one output each")
    sub.add_argument("-o", "--output", help="file to write (default: HEAD.FORMAT)")

    sub = command("report", report, "draw a head version's evaluation as one PNG (needs graft-client[report])")
    sub.add_argument("head", help="HEAD, HEAD@3 or HEAD:alias")
    sub.add_argument("-o", "--output", default="report.png")

    sub = command("webhooks", webhooks, "signed webhooks: endpoints for your events, and their delivery logs")
    hooks = sub.add_subparsers(dest="webhooks_command", required=True, metavar="WEBHOOKS_COMMAND")
    add = hooks.add_parser("add", help="register an endpoint; prints its signing secret once")
    add.add_argument("endpoint", metavar="URL", help="http(s)://HOST/PATH; its host must resolve to a public address")
    add.add_argument(
        "--event", action="append", required=True, choices=WEBHOOK_EVENTS, help="an event to send (repeat for more)"
    )
    add.add_argument("--description", default="", help="a note for you (at most 512 characters)")
    hooks.add_parser("list", help="your endpoints")
    for name, about in (
        ("delete", "delete an endpoint and its delivery log"),
        ("deliveries", "an endpoint's deliveries, newest first"),
        ("test", "send a webhook.test event to an endpoint"),
    ):
        hooks.add_parser(name, help=about).add_argument("webhook", help="webhooks/ID or an id")

    sub = command("batch", batch, "batch predictions: heads x every image of a stored dataset, in the background")
    batch_commands = sub.add_subparsers(dest="batch_command", required=True, metavar="BATCH_COMMAND")
    create = batch_commands.add_parser("create", help="queue heads x a dataset (prints it; --wait to follow it)")
    create.add_argument(
        "dataset", help="datasets/ID, an id, a display name (the newest), or a .zip or folder of images to upload first"
    )
    create.add_argument("heads", help="HEAD, HEAD@3 or HEAD:alias; several separated by commas")
    create.add_argument("--top-k", type=int, default=5, help="labels per head (default 5)")
    create.add_argument("--min-score", type=float, default=0.0, help="abstain below this top score (default 0)")
    create.add_argument("--wait", action="store_true", help="poll it until it ends")
    create.add_argument("--json", action="store_true")
    for verb, help in (("get", "one batch prediction"), ("cancel", "stop one at its next chunk")):
        one = batch_commands.add_parser(verb, help=help)
        one.add_argument("name", help="batchPredictions/ID or an id")
        one.add_argument("--json", action="store_true")
    batch_commands.add_parser("list", help="your batch predictions, newest first").add_argument(
        "--json", action="store_true"
    )
    results = batch_commands.add_parser("results", help="download a succeeded one's results")
    results.add_argument("name", help="batchPredictions/ID or an id")
    results.add_argument("--format", choices=RESULTS_FORMATS, default="jsonl")
    results.add_argument("-o", "--output", help="file to write (default: standard output)")

    sub = command("admin", admin, "tenants and API keys (needs the admin key as --api-key)")
    admin_commands = sub.add_subparsers(dest="admin_command", required=True, metavar="ADMIN_COMMAND")
    admin_commands.add_parser("create-tenant", help="create a tenant").add_argument("tenant")
    admin_commands.add_parser("create-key", help="create an API key for a tenant (printed once)").add_argument("tenant")
    return parser


if __name__ == "__main__":
    sys.exit(main())
