"""The pprof `profile.proto` messages, built at run time with protobuf.

The schema (github.com/google/pprof, proto/profile.proto, package
perftools.profiles) is written below as a field table and turned into
message classes through protobuf's descriptor API. No generated `_pb2`
module is kept, so there is no generated code to fall out of step with the
installed protobuf runtime. All of profile.proto's messages that a heap
profile uses are declared, with their field numbers unchanged.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "perftools.profiles"

_T = descriptor_pb2.FieldDescriptorProto
_INT64, _UINT64, _BOOL, _STRING, _MESSAGE = _T.TYPE_INT64, _T.TYPE_UINT64, _T.TYPE_BOOL, _T.TYPE_STRING, _T.TYPE_MESSAGE
_ONE, _MANY = _T.LABEL_OPTIONAL, _T.LABEL_REPEATED

# message -> (field name, number, type, label, message type name or None)
_SCHEMA: dict[str, list[tuple[str, int, int, int, Any]]] = {
    "Profile": [
        ("sample_type", 1, _MESSAGE, _MANY, "ValueType"),
        ("sample", 2, _MESSAGE, _MANY, "Sample"),
        ("mapping", 3, _MESSAGE, _MANY, "Mapping"),
        ("location", 4, _MESSAGE, _MANY, "Location"),
        ("function", 5, _MESSAGE, _MANY, "Function"),
        ("string_table", 6, _STRING, _MANY, None),
        ("drop_frames", 7, _INT64, _ONE, None),
        ("keep_frames", 8, _INT64, _ONE, None),
        ("time_nanos", 9, _INT64, _ONE, None),
        ("duration_nanos", 10, _INT64, _ONE, None),
        ("period_type", 11, _MESSAGE, _ONE, "ValueType"),
        ("period", 12, _INT64, _ONE, None),
        ("comment", 13, _INT64, _MANY, None),
        ("default_sample_type", 14, _INT64, _ONE, None),
    ],
    "ValueType": [
        ("type", 1, _INT64, _ONE, None),
        ("unit", 2, _INT64, _ONE, None),
    ],
    "Sample": [
        ("location_id", 1, _UINT64, _MANY, None),
        ("value", 2, _INT64, _MANY, None),
        ("label", 3, _MESSAGE, _MANY, "Label"),
    ],
    "Label": [
        ("key", 1, _INT64, _ONE, None),
        ("str", 2, _INT64, _ONE, None),
        ("num", 3, _INT64, _ONE, None),
        ("num_unit", 4, _INT64, _ONE, None),
    ],
    "Mapping": [
        ("id", 1, _UINT64, _ONE, None),
        ("memory_start", 2, _UINT64, _ONE, None),
        ("memory_limit", 3, _UINT64, _ONE, None),
        ("file_offset", 4, _UINT64, _ONE, None),
        ("filename", 5, _INT64, _ONE, None),
        ("build_id", 6, _INT64, _ONE, None),
        ("has_functions", 7, _BOOL, _ONE, None),
        ("has_filenames", 8, _BOOL, _ONE, None),
        ("has_line_numbers", 9, _BOOL, _ONE, None),
        ("has_inline_frames", 10, _BOOL, _ONE, None),
    ],
    "Location": [
        ("id", 1, _UINT64, _ONE, None),
        ("mapping_id", 2, _UINT64, _ONE, None),
        ("address", 3, _UINT64, _ONE, None),
        ("line", 4, _MESSAGE, _MANY, "Line"),
        ("is_folded", 5, _BOOL, _ONE, None),
    ],
    "Line": [
        ("function_id", 1, _UINT64, _ONE, None),
        ("line", 2, _INT64, _ONE, None),
    ],
    "Function": [
        ("id", 1, _UINT64, _ONE, None),
        ("name", 2, _INT64, _ONE, None),
        ("system_name", 3, _INT64, _ONE, None),
        ("filename", 4, _INT64, _ONE, None),
        ("start_line", 5, _INT64, _ONE, None),
    ],
}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name="memtrace/profile.proto", package=PACKAGE, syntax="proto3")
    for message, fields in _SCHEMA.items():
        m = fd.message_type.add(name=message)
        for name, number, ftype, label, type_name in fields:
            f = m.field.add(name=name, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = f".{PACKAGE}.{type_name}"
    return fd


def _message_classes() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(_file_descriptor().SerializeToString())
    classes = {}
    for message in _SCHEMA:
        desc = pool.FindMessageTypeByName(f"{PACKAGE}.{message}")
        if hasattr(message_factory, "GetMessageClass"):
            classes[message] = message_factory.GetMessageClass(desc)
        else:  # protobuf < 4.21
            classes[message] = message_factory.MessageFactory(pool).GetPrototype(desc)
    return classes


_CLASSES = _message_classes()
Profile = _CLASSES["Profile"]
