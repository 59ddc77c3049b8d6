"""Instruction following: IFEval-style verifiable instructions and their checkers
(instructions.py), IFEval's strict/loose scoring (scoring.py), generated instruction
conversations and preference pairs (tasks.py, generate.py; shipped in data/), and the
evaluation of a model (evaluate.py)."""
