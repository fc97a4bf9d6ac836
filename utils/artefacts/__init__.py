"""What a run writes and reads back: atomic writes and safe loading (``files``), the checkpoint, results,
heads and trunk (``checkpoint``, ``results``, ``model_files``), what a run folder holds (``run_folder``)
and the plots (``plot``)."""
