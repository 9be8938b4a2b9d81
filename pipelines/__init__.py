"""Data engineering for cxr: label vocabularies, source adapters, phantoms, split, preprocessing, EDA."""
