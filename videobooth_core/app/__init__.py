"""Applications built on the core: the command line (``cli``), the demo, batch jobs (``jobs``), the start frames
of long videos (``long_video``), several subjects from flags (``subjects``) and tiny model sets (``tiny``)."""
