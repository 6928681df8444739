"""Demonstrations that run offline on a CPU: :mod:`jlrp.demos.text` (the similarity of sentence pairs
explained on the real all-MiniLM-L6-v2). The digits demo is :mod:`jlrp.demo`."""
