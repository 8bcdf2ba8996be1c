from dataclasses import asdict

from sarkd_diag.events import Event, events_frame
from sarkd_diag.query import EventFilter


def test_rank_filter_keeps_one_process_events():
    frame = events_frame([asdict(Event("precision_setup", rank=0)), asdict(Event("precision_setup", rank=1)),
                          asdict(Event("nonfinite_grad", "critical", step=3, rank=1))])
    assert EventFilter(rank=1).apply(frame)["rank"].tolist() == [1, 1]
    assert EventFilter(rank=0).apply(frame)["kind"].tolist() == ["precision_setup"]
    assert len(EventFilter().apply(frame)) == 3
