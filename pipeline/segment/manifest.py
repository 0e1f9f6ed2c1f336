"""The job manifest, ``OUTPUT/_manifest.json``: what produced this output.

It names the input, the weights (file name and SHA-256), the model configuration, the options
that change results, the versions and the plan, and at the end the totals. It is also what
makes a rerun safe: a rerun into the same output must ask for the same job (``identity``),
otherwise it would mix rows of two different jobs. Never a credential: URLs are stored with
``public_url`` and storage options are not stored at all.
"""

import datetime
import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from fsspec import AbstractFileSystem

from maskray.pipeline.storage import join, read_bytes, write_bytes_atomically

MANIFEST_FILE = "_manifest.json"
FORMAT = "maskray.segment"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    input: str
    output: str
    weights: dict[str, str]  # {"name": ..., "file": ..., "sha256": ...} (maskray.pipeline.weights.Weights.describe)
    config: dict[str, Any]  # the model configuration, after the job's overrides
    options: dict[str, Any]  # what changes results: shard_size, batch_size, max_pixels
    versions: dict[str, str]
    plan: dict[str, Any] = field(default_factory=dict)  # num_images, num_shards, shard_size, file, skipped_files
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    status: str = "running"  # "running" until every shard is done, then "complete"
    totals: dict[str, Any] = field(default_factory=dict)  # images, ok, errors, instances
    # The precisions inference ran in, over every run into this output (config.precision is what was asked: "auto" resolves per device).
    precision: list[str] = field(default_factory=list)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def identity(self) -> dict[str, Any]:
        """What a rerun into the same output must share with the first run."""
        return {"input": self.input, "weights_sha256": self.weights["sha256"], "config": self.config, "options": self.options}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def write(self, fs: AbstractFileSystem, output: str) -> None:
        write_bytes_atomically(fs, join(output, MANIFEST_FILE), self.to_json().encode())

    @classmethod
    def read(cls, fs: AbstractFileSystem, output: str) -> "Manifest | None":
        path = join(output, MANIFEST_FILE)
        try:  # one GET, retried through throttling and dropped connections; a missing file is final
            data = json.loads(read_bytes(fs, path))
        except FileNotFoundError:
            return None
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a maskray segmentation manifest")
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


def identity_mismatch(stored: Manifest, wanted: Manifest) -> list[str]:
    """The names of what differs between a stored job and the one asked for (empty: the same)."""
    a, b = stored.identity(), wanted.identity()
    differences = [k for k in a if k not in ("config", "options") and a[k] != b[k]]
    differences += [f"config.{k}" for k in sorted(set(a["config"]) | set(b["config"])) if a["config"].get(k) != b["config"].get(k)]
    # An option left to the job (None: batch_size chosen for the device) takes what the stored job ran with.
    differences += [f"{k}" for k in sorted(set(a["options"]) | set(b["options"]))
                    if b["options"].get(k) is not None and a["options"].get(k) != b["options"].get(k)]
    return differences
