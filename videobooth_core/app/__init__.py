"""Applications built on the core: the command line, the demo, batch jobs, video output and tiny model sets."""
