"""What the driver checks about a job's data before any worker starts (``validate`` and
``train`` both run it): the data URLs exist and hold what the config names (the split, classes
left after ``exclude_classes``), the training data can fill the global batch, and a teacher
loads and fits the student and its data (:func:`rsk_dist.teacher.check_teacher`). Each
failure names the field and the fix; the config's value ranges are checked by its models."""
from __future__ import annotations

from collections import Counter

from rsk_dist.config import DataSource, JobConfig
from rsk_dist.storage import StorageError, preflight, redact


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    # as the sources apply it: a class name, or its first path component
    return name in exclude or name.split("/")[0] in exclude


def _class_names(spec: DataSource, field: str) -> tuple[list[str], str | None]:
    """One class name per image of the source (before exclusion), and the dataset's fingerprint."""
    if spec.kind == "digits":
        from rsk_dist.data.sources import digits_split

        return [str(int(y)) for y in digits_split(spec.split or "train").labels], None
    if spec.kind == "zip":
        from rsk_dist.data.omniglot import image_folder_classes

        try:
            return image_folder_classes(spec.url.removeprefix("file://")), None
        except (FileNotFoundError, ValueError) as err:
            raise StorageError(f"{field}.url: {err}: fix the path") from None
    try:
        dataset = preflight(spec.url, need_index=True, split=spec.split)
    except StorageError as err:
        raise StorageError(f"{field}: {err}") from None
    assert dataset is not None  # need_index
    names = dataset.index.column("class_name").to_pylist()
    if spec.split is not None:
        names = [n for n, s in zip(names, dataset.index.column("split").to_pylist()) if s == spec.split]
    return names, dataset.manifest.get("fingerprint")


def check_data(config: JobConfig) -> str | None:
    """Checks the job's data sources against the config; returns the training dataset's
    fingerprint (None for built-in and zip sources). Raises :class:`StorageError` or
    ``ValueError`` naming the field."""
    fingerprint = None
    for field in ("train", "eval"):
        spec: DataSource | None = getattr(config.data, field)
        if spec is None:
            continue
        names, found = _class_names(spec, f"data.{field}")
        counts = Counter(n for n in names if not _excluded(n, spec.exclude_classes))
        where = f"{spec.kind} source {redact(spec.url or spec.split or '')}"
        if not counts:
            raise ValueError(
                f"data.{field}.exclude_classes leaves no images in the {where} "
                f"(it excludes all of its {len(set(names))} classes): exclude fewer"
            )
        if field == "train":
            fingerprint = found
            s = config.sampler
            need, usable = s.batch_size // s.samples_per_class, sum(c >= s.samples_per_class for c in counts.values())
            if usable < need:
                raise ValueError(
                    f"sampler.batch_size {s.batch_size} needs {need} classes with at least samples_per_class="
                    f"{s.samples_per_class} images, but data.train ({where}) has {usable}: lower "
                    "sampler.batch_size or sampler.samples_per_class"
                )
    if config.teacher is not None:
        from rsk_dist.teacher import check_teacher, load_teacher

        t = config.teacher
        field = "teacher.checkpoint" if t.checkpoint else "teacher.export" if t.export else "teacher.model.pretrained"
        try:
            teacher = load_teacher(t)
        except (FileNotFoundError, ValueError) as err:  # StorageError and CheckpointError are ValueErrors
            raise ValueError(f"{field}: {err}") from None
        check_teacher(config, *teacher)
    return fingerprint
