"""Model families split into bottom / trunk / top.

This package imports no family module (and so neither torch nor transformers) on import;
:class:`splitlearn.models.registry.ModelRegistry` imports a family's module when it is asked for.
"""
