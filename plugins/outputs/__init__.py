"""Output writers of one edit: the atomic result files, and the trace, GIF and progress plugins
on the event hooks."""
