"""``:monitor``: a head version's drift status and every replica's windows, with what to read them against."""

from adapters.kinds import get_kind
from adapters.monitoring import MIN_TRAIN_ROWS, MonitoringReference
from service.resources import HeadMonitoring, LiveAccuracy, head_version_ref, resource_id
from service.store.heads import HeadRegistry, ServedVersion
from service.store.observations import Observations
from service.store.windows import MonitorWindows


def monitored_ref(name: str) -> str:
    """'heads/{head}' (the version it serves by default: latest) or 'heads/{head}/versions/{version}' -> a ref."""
    if "/versions/" in name:
        head, version = head_version_ref(name)
        return f"{head}@{version}"
    return resource_id(name, "heads")


def monitoring_report(
    registry: HeadRegistry, windows: MonitorWindows, observations: Observations, info: ServedVersion
) -> HeadMonitoring:
    """The version's monitoring as stored (call after flushing this replica, so its own windows are in)."""
    tenant, name, version = info.tenant, info.name, info.version
    state = windows.drift_state(tenant, name, version)
    tensors = registry.load_monitoring(info)
    distribution = None if tensors is None else MonitoringReference.from_tensors(tensors).label_distribution.tolist()
    labelled, accuracy = observations.live_accuracy(tenant, name, version)
    return HeadMonitoring(
        head=name,
        version=version,
        status=state.status,
        drifting_since=state.drifting_since,
        evidence=state.evidence,
        reference=tensors is not None,
        reference_note=None if tensors is not None else _why_no_reference(info),
        labels=info.classes,
        training_label_distribution=distribution,
        live=LiveAccuracy(labelled=labelled, accuracy=accuracy),
        windows=windows.windows(tenant, name, version),
    )


def _why_no_reference(info: ServedVersion) -> str:
    if get_kind(info.kind).copies_tail:
        return (
            "a fine-tuned head reads the trunk before its pooled features, which serving then never computes: "
            "its windows count labels, confidences and abstentions, without OOD scores or drift tests"
        )
    return (
        f"trained on fewer than {MIN_TRAIN_ROWS} training examples, or before graft monitored versions: its windows "
        "count labels, confidences and abstentions, without OOD scores or drift tests; train it again to get one"
    )
