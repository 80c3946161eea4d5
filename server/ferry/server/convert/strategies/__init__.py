"""The registries of conversion strategies: how a model may be quantized and pruned.

One entry per strategy holds everything the rest of Ferry needs to know about it (its name, what it
builds, whether it needs calibration data, when ``auto`` skips it and why, and how it is built), so
that validation, the child's plan, the report and the docs tables all derive from it and a new
strategy is added here alone. Importable by the serving process: nothing here imports torch, and
the builders import ``onnxruntime.quantization`` or torch inside themselves, when the conversion
child calls them.
"""
