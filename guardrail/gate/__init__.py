"""InferAligner: what the gate reads of a prompt's activations (`readout`), the safety vectors
and steering directions (`vectors`), and the calibrated gate and steering as stored (`artifact`).
"""
