"""Results I/O: files written atomically, incremental CSVs that resume and refuse to mix settings, and table readers
that keep ids as text (:mod:`probes.io.results`). The bottom room: the library and the report writers
(``analyses``) both import it, and it imports nothing of the package.
"""
