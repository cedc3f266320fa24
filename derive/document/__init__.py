"""The derivation documents' own machinery: notation, displays that fit a page, the backward pass of
the spec as written, worked numbers and the code that runs. ``derivation.py`` and
``derivation_steps.py`` assemble the documents from these parts; nothing here is written per layer."""
