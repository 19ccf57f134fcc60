"""Everything offline: the shipped and public data, calibration of the gate and steering
(`gate`) and of the cost models and critic (`safety`), the judges, and the artifact store that
lets a worker load instead of calibrating (`store`).
"""
