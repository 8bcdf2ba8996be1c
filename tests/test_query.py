from sarkd_diag.contract.events import events_frame
from sarkd_diag.presentation.query import EventFilter


def _row(kind, severity="info", step=0, rank=0):  # as events.jsonl holds them: independent of how events are made
    return {"kind": kind, "severity": severity, "step": step, "rank": rank, "phase": "setup", "message": ""}


def test_rank_filter_keeps_one_process_events():
    frame = events_frame([_row("precision_setup", rank=0), _row("precision_setup", rank=1),
                          _row("nonfinite_grad", "critical", step=3, rank=1)])
    assert EventFilter(rank=1).apply(frame)["rank"].tolist() == [1, 1]
    assert EventFilter(rank=0).apply(frame)["kind"].tolist() == ["precision_setup"]
    assert len(EventFilter().apply(frame)) == 3
