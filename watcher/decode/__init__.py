"""Map bytes to values: BTF, Cilium's layouts, declared layouts, rendered like bpftool.

Owns the BTF parser (:mod:`.btf`) and formatter compiler (:mod:`.btfformat`), the whole
chunk renderers (:mod:`.dumptext`, :mod:`.textrows`), Cilium's layout table and decoders
(:mod:`.cilium`, :mod:`.ciliumdecode`), ``[[layouts]]`` (:mod:`.layout`) and the choice
between them (:mod:`.choose`).

Pure code: must never open a map or issue a syscall, so a client decodes with the BTF
blob the daemon ships exactly as the daemon would.
"""
