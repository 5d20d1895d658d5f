"""The daemon: decides what to watch, polls it, publishes the changes, answers requests.

Owns the daemon's lifecycle (:mod:`.main`: built in dependency order, one exit stack),
demand and holds (:mod:`.demand`), the host's maps (:mod:`.inventory`, :mod:`.catalog`,
:mod:`.discovery`), polling (:mod:`.polling`) and both engines' diffs (:mod:`.diff`), the
stream (:mod:`.publisher`), the request server (:mod:`.server`), who may connect and what
they see (:mod:`.zap`, :mod:`.access`, :mod:`.subgate`), event sources (:mod:`.sources`),
its config (:mod:`.config`), reload, privileges, metrics and logs.  Its seams are
Protocols in :mod:`.interfaces` and :mod:`.queries`.

Must never write a watched map (fds read-only, a seccomp filter, programs checked), nor
import from :mod:`consumers`.
"""
