"""The data pipeline: a task's folders and manifest (``manifest``, ``tasks``), decoding and the in-memory
cache (``decode``, ``cache``), the batches and transforms both paths share (``batches``, ``transforms``),
the validation split (``validation``) and the record of every image a run read (``fingerprint``)."""
