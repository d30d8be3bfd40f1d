"""``audioldm2-weights fetch REPO_ID [--revision REV]``: download only the files this stack uses.

The hub repos hold more than inference needs: both ``.bin`` and ``.safetensors`` of most components, and
sometimes ``fp16`` variants. The selection is ``audioldm2_core.loading.hub_patterns`` (configs, tokenizers,
one weight format per component) and the download is ``loading.hub_snapshot``, the same call
``AudioLDM2.from_pretrained`` makes, so the files land in the ordinary hub cache (``HF_HOME``) with
huggingface_hub's progress bars and resumption of interrupted downloads. Sizes come from the repo's file
list (``HfApi.model_info(files_metadata=True)``) to report what was saved against a full snapshot.

Offline (``HF_HUB_OFFLINE=1``) nothing can be listed: the command then only checks the cache.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from audioldm2_core.errors import CheckpointError
from audioldm2_core.loading import Checkpoint, hub_errors, hub_patterns, hub_snapshot

from .files import human_bytes


@dataclass(frozen=True)
class FetchPlan:
    """Which files of a repo are fetched, and their bytes against the whole repo."""

    patterns: list[str]
    selected: list[str]
    selected_bytes: int
    total_files: int
    total_bytes: int

    @property
    def saved_bytes(self) -> int:
        return self.total_bytes - self.selected_bytes


def plan(sizes: Mapping[str, int | None]) -> FetchPlan:
    """The files of a repo (``{path: size}``, sizes as the hub lists them) that ``fetch`` downloads."""
    from huggingface_hub.utils import filter_repo_objects

    patterns = hub_patterns(sizes)
    # the matcher snapshot_download itself applies to allow_patterns, so this is exactly what it fetches
    selected = sorted(filter_repo_objects(sizes, allow_patterns=patterns))
    return FetchPlan(
        patterns=patterns,
        selected=selected,
        selected_bytes=sum(sizes[f] or 0 for f in selected),
        total_files=len(sizes),
        total_bytes=sum(s or 0 for s in sizes.values()),
    )


def fetch(repo_id: str, revision: str | None = None) -> tuple[Path, FetchPlan | None]:
    """Download (or, offline, find in the cache) the files we use; return the folder and, online, the plan."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return hub_snapshot(repo_id, revision), None
    with hub_errors(repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    return hub_snapshot(repo_id, revision, files=list(sizes)), plan(sizes)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo_id", help="hub repo id, e.g. cvssp/audioldm2")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")


def run(args: argparse.Namespace) -> int:
    if Path(args.repo_id).expanduser().is_dir():
        print(f"{args.repo_id} is a local folder: nothing to fetch")
        return 0
    if args.repo_id.count("/") != 1 or args.repo_id.startswith((".", "/", "~")):
        raise CheckpointError(f"{args.repo_id}: not a hub repo id of the form 'owner/name'")
    folder, p = fetch(args.repo_id, args.revision)
    name = args.repo_id + (f"@{args.revision}" if args.revision else "")
    print(f"{name} -> {folder}")
    if p is None:
        print("offline (HF_HUB_OFFLINE is set): found in the local cache; sizes not listed")
    else:
        share = p.saved_bytes / p.total_bytes if p.total_bytes else 0.0
        print(
            f"{len(p.selected)} of {p.total_files} files, {human_bytes(p.selected_bytes)} of "
            f"{human_bytes(p.total_bytes)}: {human_bytes(p.saved_bytes)} ({share:.0%}) not downloaded "
            "(other weight formats, variants, extras)"
        )
    try:
        Checkpoint(folder, source=name)
        print("opens as an AudioLDM 2 checkpoint: yes")
    except CheckpointError as e:
        print(f"opens as an AudioLDM 2 checkpoint: no ({e})")
    return 0
