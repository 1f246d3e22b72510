"""Rendering of bnfold's results for people: rich console output and Markdown summaries.

``text`` makes every model- or file-controlled string inert, ``console`` draws results on a rich
Console, ``markdown`` writes GitHub-flavoured Markdown. Nothing here is imported by ``import bnfold``.
"""
