"""The enginewright command: a thin layer over the Python API.

Progress and messages go to stderr; `run --json` prints only the report JSON on stdout.
Exit codes: 0 success, 1 a stage failed (verification or build), 2 bad input.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .errors import EnginewrightError

STAGES = ("load", "quantize", "export", "simplify", "precision", "engine", "package")


def _console():
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:  # logs and CI: do not squeeze tables to 80 columns
        console = Console(stderr=True, width=140)
    return console


def _fail(exc: EnginewrightError) -> None:
    console = _console()
    console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
    run_dir = getattr(exc, "run_dir", None)
    if run_dir is not None:
        console.print(f"report: {run_dir / 'report.md'}", highlight=False)
    sys.exit(exc.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="enginewright")
def main() -> None:
    """enginewright: recipes in, verified engines out."""
    quiet_import_noise()


# Libraries imported on the way that log at import time about things this tool never uses: torchao
# (installed with GPT-QModel; transformers imports it whenever it is present) cannot load its CUDA
# kernels on a CPU machine, and torch notes a deprecated registration torchao makes.
IMPORT_NOISE = ("torchao", "torch.utils._pytree")


def quiet_import_noise() -> None:
    import logging

    for name in IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


cache_option = click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                            help="Artifact cache (default: $ENGINEWRIGHT_CACHE or ./artifacts).")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--force", type=click.Choice(STAGES), default=None, help="Rebuild this stage and every stage after it.")
@click.option("--until", type=click.Choice(STAGES), default=None, help="Stop after this stage.")
@click.option("--json", "as_json", is_flag=True, help="Print the report JSON on stdout.")
@click.option("--no-memory-check", is_flag=True, help="Build even if a stage's memory or disk estimate exceeds what is free.")
@cache_option
def run(recipe: Path, force: str | None, until: str | None, as_json: bool, no_memory_check: bool,
        cache_dir: Path | None) -> None:
    """Run RECIPE: build what the cache lacks, verify every stage, write a report."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .logs import stdout_to_stderr
    from .pipeline import Pipeline

    console = _console()
    # standard output carries the report alone (under --json) or nothing: what a library prints goes to stderr
    with stdout_to_stderr() as stdout:
        try:
            with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                          transient=True) as progress:
                task = progress.add_task("starting", total=None)

                def say(msg: str) -> None:
                    progress.update(task, description=msg)
                    progress.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}", highlight=False)

                result = Pipeline.from_recipe(recipe, cache_dir, say=say).run(
                    force=force, until=until, check_memory=not no_memory_check)
        except EnginewrightError as exc:
            if as_json:  # a failed run's report, or the error alone when it failed before any stage ran
                report = getattr(exc, "report", None) or {"schema_version": 1, "status": "failed", "error": str(exc)}
                stdout.write(json.dumps(report, indent=2, default=str) + "\n")
                stdout.flush()
            _fail(exc)
            return
        if as_json:
            stdout.write(json.dumps(result.report, indent=2, default=str) + "\n")
            stdout.flush()
    if not as_json:
        _print_summary(console, result.report)
    console.print(f"report: {result.run_dir / 'report.md'}", highlight=False)


def _print_summary(console, report) -> None:
    from rich.table import Table

    from .report import accuracy_summary, not_checked, speed_summary

    table = Table(title=f"{report['recipe']['name']}: {report['status']} in {report['seconds']:.1f} s")
    for col in ("stage", "cache", "s", "peak RSS GB (plan)", "verify", "not checked", "accuracy against PyTorch",
                "speed (measured in this build)"):
        table.add_column(col)
    for s in report["stages"]:
        m = s["verify"]["metrics"]
        skipped = len(s["verify"].get("not_checked", []))
        mem = s.get("memory") or {}
        rss = "–" if not mem else f"{mem['peak_rss_bytes'] / 1e9:.1f}" + (
            f" ({mem['estimate_bytes'] / 1e9:.1f})" if mem.get("estimate_bytes") else "")
        table.add_row(s["name"], "hit" if s["cached"] else "built", f"{s['seconds']:.2f}", rss,
                      "passed" if s["verify"]["passed"] else "FAILED", str(skipped) if skipped else "–",
                      accuracy_summary(m), speed_summary(m))
    console.print(table)
    for stage, item in not_checked(report):
        console.print(f"[yellow]not checked[/] {stage}: {item['what']}: {item['why']}", highlight=False)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--until", type=click.Choice(STAGES), default=None)
@cache_option
def plan(recipe: Path, until: str | None, cache_dir: Path | None) -> None:
    """Dry run: each stage, its cache key, and hit or miss. Loads no model."""
    from .pipeline import Pipeline

    try:
        pipe = Pipeline.from_recipe(recipe, cache_dir)
        planned = pipe.plan(until=until)
        estimate = pipe.gpu_estimate(planned)
    except EnginewrightError as exc:
        _fail(exc)
        return
    from .memory import available_bytes, free_disk_bytes, gib

    have = available_bytes()
    click.echo(f"{'stage':<9} {'cache':<8} {'peak memory (est.)':<19} {'disk (est.)':<12} key")
    for p in planned:
        click.echo(f"{p.name:<9} {p.status:<8} {gib(p.peak_memory_bytes):<19} {gib(p.disk_bytes):<12} "
                   f"{p.key}  {p.detail}")
    to_build = [p for p in planned if p.status != "hit"]
    if have is not None:
        worst = max((p.peak_memory_bytes for p in to_build), default=0)
        verdict = "fits" if worst <= have else "DOES NOT FIT: run refuses it (or --no-memory-check)"
        click.echo(f"memory available: {gib(have)}; largest stage to build: {gib(worst)}: {verdict}")
    free = free_disk_bytes(pipe.cache.root)
    if free is not None:
        writes = sum(p.disk_bytes for p in to_build)
        verdict = "fits" if writes <= free else "DOES NOT FIT: free space or choose another --cache-dir"
        click.echo(f"disk free under {pipe.cache.root}: {gib(free)}; the stages to build write about "
                   f"{gib(writes)}: {verdict}")
    if estimate is not None:
        from .gpu_estimate import render

        for line in render(estimate):
            click.echo(line)


@main.command()
@click.option("--quick", is_flag=True, help="Tiny model only, 1 thread, short workloads (about 2 minutes).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench"),
              show_default=True, help="Folder for results.json, results.md and chart.png.")
@cache_option
def bench(quick: bool, out_dir: Path, cache_dir: Path | None) -> None:
    """Benchmark every engine side by side with PyTorch and the peers (speed, memory, agreement, roofline)."""
    from .bench.run import run_bench
    from .pipeline import cache_root

    console = _console()
    try:
        result = run_bench(out_dir, cache_root(cache_dir), quick=quick,
                           say=lambda m: console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {m}", highlight=False))
    except EnginewrightError as exc:
        _fail(exc)
        return
    click.echo((out_dir / "results.md").read_text())
    for f in result.files:
        console.print(f"wrote {f}", highlight=False)


@main.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy the converted Hugging Face folder here.")
@cache_option
def import_model(source: Path, out_dir: Path | None, cache_dir: Path | None) -> None:
    """Convert a GGUF file (or package:<module>/<file>.gguf) into a Hugging Face folder, once, in the cache.

    Prints the folder; a recipe whose model.path names the same GGUF uses it without converting again."""
    import shutil

    from .cache import ENTRY, MANIFEST, ArtifactCache
    from .gguf_import import gguf_record, import_gguf
    from .logs import stdout_to_stderr
    from .pipeline import cache_root
    from .recipe import PACKAGE_PREFIX, package_path

    console = _console()
    try:
        path = package_path(str(source), Path.cwd()) if str(source).startswith(PACKAGE_PREFIX) else source
        with stdout_to_stderr():
            folder = import_gguf(path, ArtifactCache(cache_root(cache_dir)),
                                 say=lambda m: console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {m}",
                                                             highlight=False))
    except EnginewrightError as exc:
        _fail(exc)
        return
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            if f.name not in (ENTRY, MANIFEST) and f.is_file():
                shutil.copy2(f, out_dir / f.name)
        folder = out_dir
    record = gguf_record(folder) or {}
    console.print(f"{record.get('file')}: {record.get('file_type')} ({record.get('architecture')}), dequantized to "
                  f"{record.get('dequantized_to')}", highlight=False)
    click.echo(str(folder))


@main.group()
def cache() -> None:
    """Inspect and trim the artifact cache."""


@cache.command("ls")
@cache_option
def cache_ls(cache_dir: Path | None) -> None:
    """List cache entries: key, stage, recipe, size, age."""
    from .cache import ArtifactCache, entry_size
    from .pipeline import cache_root

    store = ArtifactCache(cache_root(cache_dir))
    total = 0
    for e in store.entries():
        size = entry_size(e.path)
        total += size
        age_h = (time.time() - e.meta.get("created", time.time())) / 3600
        click.echo(f"{e.key}  {e.meta.get('stage', '?'):<9} {e.meta.get('recipe', '?'):<16} "
                   f"{size / 1e6:9.2f} MB  {age_h:7.1f} h")
    click.echo(f"{len(store.entries())} entries, {total / 1e6:.2f} MB in {store.root}")


@cache.command("gc")
@click.option("--max-size", "max_size_mb", type=float, default=None,
              help="Delete least recently created unused entries until the cache is under this many MB.")
@click.option("--keep-runs", type=int, default=5, show_default=True,
              help="Entries used by the newest N run reports are always kept.")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted.")
@cache_option
def cache_gc(max_size_mb: float | None, keep_runs: int, dry_run: bool, cache_dir: Path | None) -> None:
    """Delete entries that recent runs do not use (all of them, or down to --max-size)."""
    from .cache import ArtifactCache
    from .gc import collect
    from .pipeline import cache_root

    store = ArtifactCache(cache_root(cache_dir))
    removed, kept = collect(store, keep_runs=keep_runs, max_bytes=None if max_size_mb is None else max_size_mb * 1e6,
                            dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for key, size in removed:
        click.echo(f"{verb} {key} ({size / 1e6:.2f} MB)")
    click.echo(f"{verb} {len(removed)} entries; kept {kept}")


if __name__ == "__main__":
    main()
