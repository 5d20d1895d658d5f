"""Reading BPF ring buffers and perf event arrays by mapping them ourselves.

Owns the readers (:mod:`.ringbuf`, :mod:`.perfbuf`), the choice of reader from a
map's kind (:mod:`.reader`) and what a read hands back (:mod:`.chunk`: records as
two flat buffers, never one Python object per record).

Must never drop a record without counting it: lost counts come back with the data.
"""
