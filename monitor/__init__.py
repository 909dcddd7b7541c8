"""Monitor side: ingest, store, reachability, incidents, metrics, pages, status page, reports."""
