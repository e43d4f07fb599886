"""The adapter overrides pysyncobj 0.3.17 internals: fail loudly if the installed sources are different."""

import hashlib
from pathlib import Path

import pysyncobj
import pysyncobj.syncobj
from pysyncobj import SyncObj

# sha256 of the files whose internals consensus/raft/adapter.py and transport.py depend on, as shipped in
# the pysyncobj 0.3.17 sdist (sha256 8aaef681...dfe765). A new release must be re-read before it is used.
pinned_sources = {
    "syncobj.py": "e8bdf06797085d734df86e24ab4802fe87893dff77268565ec036f7ad4a1cfe4",
    "serializer.py": "4d39fde2f15000ad8f507ec229ebd4f6a86371b6f84d4dc1439a9cccd52857ee",
    "transport.py": "0c9d89f9c4781ec9772df8011d7975a1a4a1a5f541357e12eae85a813e92b50b",
    "node.py": "e4a3f027cd8291f558334bb9c977e952f6b6989e7e1fa1588d3005ef0b990e2c",
    "config.py": "fbbc7ff9f18e4d15a7fd563376e42f5bd192956879d4b810b056d5248b955698",
    "poller.py": "f69ac749fb410670282fd9520c5805ffc684c8a5f762a927127753d9be8551e6",
    "version.py": "0b8426a8b52ecf874193897d26c4214acbd85335145ea9ff17e27a22b1132943",
}


def test_installed_pysyncobj_sources_are_the_pinned_ones():
    package = Path(pysyncobj.__file__).parent
    different = {
        name: hashlib.sha256((package / name).read_bytes()).hexdigest()
        for name in pinned_sources
        if hashlib.sha256((package / name).read_bytes()).hexdigest() != pinned_sources[name]
    }
    assert not different, (
        f"pysyncobj sources changed ({sorted(different)}): re-read them against consensus/raft/adapter.py "
        "and transport.py before updating the pin"
    )


def test_the_internals_the_adapter_overrides_exist():
    for name in ("_SyncObj__doApplyCommand", "_SyncObj__parseChangeClusterRequest", "_SyncObj__onMessageReceived",
                 "_onTick", "_applyCommand", "_isLeader", "_getLeader", "getStatus", "isReady", "addOnTickCallback"):
        assert callable(getattr(SyncObj, name, None)), name
    assert callable(pysyncobj.syncobj.createJournal)
    source = Path(pysyncobj.syncobj.__file__).read_text()
    # The adapter pushes this deadline forward to stop a recovering node from campaigning.
    assert "self.__raftElectionDeadline = monotonicTime() + self.__generateRaftTimeout()" in source
    # The apply index is raftLastApplied + 1 only because the counter is bumped after the apply returns.
    assert "res = self.__doApplyCommand(entry[0])" in source
    assert source.index("res = self.__doApplyCommand(entry[0])") < source.index("self.__raftLastApplied += 1")
    # The proposer's callback gets what the apply returned (the adapter returns the index it handed over).
    assert "callback(res, FAIL_REASON.SUCCESS)" in source


def test_the_serializer_the_adapter_replaces_is_built_and_consulted_as_it_expects():
    """consensus/raft/adapter.py routes pysyncobj's Serializer through a factory and writes snapshots on a
    thread: it relies on SyncObj building the serializer by that module-level name, and on compaction
    dropping the journal only once checkSerializing reports SUCCESS."""
    from pysyncobj.serializer import Serializer

    source = Path(pysyncobj.syncobj.__file__).read_text()
    assert "self.__serializer = Serializer(self.__conf.fullDumpFile," in source
    compaction = source[source.index("def __tryLogCompaction"):]
    assert compaction.index("if serializeState == SERIALIZER_STATE.SUCCESS:") < compaction.index("self.__deleteEntriesTo(serializeID)")
    assert compaction.index("self.__deleteEntriesTo(serializeID)") < compaction.index("if serializeState == SERIALIZER_STATE.FAILED:")
    for name in ("serialize", "checkSerializing", "getTransmissionData", "setTransmissionData", "deserialize"):
        assert callable(getattr(Serializer, name, None)), name
