"""The option classes of every stage and training command, torch-free.

A recipe is validated (`dcomp recipe validate`, the first step of `dcomp run`) and a command
declares its options without importing torch: 2 s of start-up on every command of a shell pipe.
The modules that carry a stage out (dcomp.compressors.*, dcomp.retrain, ...) import their class
from here and re-export it, so ``from dcomp.compressors.pruning import PruneConfig`` still works.
Nothing in this package may import torch, numpy or a module that does.
"""
