"""The process runtime: torchrun ranks (``distributed``), signals and safe points (``interrupt``), and the
one-writer lock of a folder (``folder_lock``)."""
