"""chartrl helper package: everything the notebooks call.

Data flows one way: parameters -> config -> data + model -> trainer -> checkpoints (+ sync)
-> sampling -> samples file -> passk -> results file -> plots and widgets.
"""

__version__ = "0.1.0"
