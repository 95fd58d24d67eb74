"""Builders the tests share: shrunk configs, tiny finished runs, toy tasks, reference models.

Imported as `helpers`: pytest's default import mode puts tests/, the directory of the root
conftest.py, on sys.path."""
