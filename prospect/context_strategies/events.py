"""What a cache reduction is called in a trace record's `events` (prospect/stream/frame_record.py): each
strategy names its reductions with one of these (`BaseContextStrategy.event`). Stdlib only."""

COMPRESS = "compress"  # some tokens evicted (drop_middle, the zoo)
RESET = "reset"  # the cache emptied (drop_all, none)
SUMMARY = "summary"  # the cache replaced by a decoded summary (summarize_and_drop)
REDUCTION_EVENTS = (COMPRESS, RESET, SUMMARY)
