"""Facades that keep other tools' names working over histolight's native API (see :mod:`.slideflow`)."""
