"""The site's side of Flower's ClientApp runtime API (the SuperNode on loopback, plain HTTP, as Flower's own).

:func:`runtime_client` is the client the launcher and every task use. :func:`pull_task_input` is
Flower 1.41's ``flwr.supernode.runtime.run_clientapp.pull_task_input`` with a short retry: the
SuperNode offers a task before it has pulled the message's contents from the SuperLink, and a
task process that asks at once (a warm one does) would otherwise wait out Flower's 1 s, then 2 s
backoff for them. :func:`answer_for` replies in
place of a task process that died or was stopped before it replied: the error reply carries Flower's
own ``ErrorCode.CLIENT_APP_CRASHED`` (the code the SuperNode uses when a ClientApp's heartbeat
lapses), so the server treats it as it treats Flower's, and the SuperNode forwards it and takes its
next message at once instead of after that heartbeat's ~60 s. A task hands what this needs (its
message's metadata, never its content) to its parent with :func:`message_metadata`.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, message_from_proto, run_from_proto
from flwr.common.serde_utils import metadata_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.message_pb2 import Metadata as ProtoMetadata  # pylint: disable=E0611
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

log = logging.getLogger(__name__)

CLIENTAPP_COMPONENT = "flwr-clientapp"
LAUNCHER_COMPONENT = "SuperExec"
ANSWER_TRIES = 3  # the SuperNode may be gone too: do not block the worker for long
PULL_BACKOFF_S = 0.02  # first retry for message contents the SuperNode does not hold yet (Flower: 1 s)
PULL_BACKOFF_CAP_S = 0.5  # and the longest (Flower: 10 s)


def runtime_client(address: str, component: str, token: str | None = None, max_tries: int | None = None) -> Any:
    """A runtime API client for the SuperNode at ``address``; with ``token`` it acts for that task."""
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    retry = make_simple_http_retry_invoker()
    if max_tries is not None:
        retry.max_tries = max_tries
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, interceptors=interceptors, retry_invoker=retry,
    )


def pull_task_input(client: Any) -> tuple[Message, Context, Any, Any]:
    """The task's message, context, run and FAB, as Flower's own ``pull_task_input`` returns them."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run, fab = run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message from the SuperNode's runtime API for this task")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower: the id is the tree's, not recomputed
    return message, context, run, fab


def message_metadata(message: Message) -> bytes:
    """The message's metadata (ids, nodes, type, ttl) as bytes; never its content."""
    return metadata_to_proto(message.metadata).SerializeToString()


def answer_for(address: str, token: str, metadata: bytes, node_id: int, run_id: int, reason: str,
               reply: bool = True) -> bool:
    """Reply ``reason`` (an error) to the message of the task holding ``token`` (unless ``reply`` is
    False: it replied already), then finish that task as failed."""
    client = runtime_client(address, CLIENTAPP_COMPONENT, token, max_tries=ANSWER_TRIES)
    try:
        if reply:
            message = message_from_proto(ProtoMessage(metadata=ProtoMetadata.FromString(metadata),
                                                      content=ProtoRecordDict()))
            context = Context(run_id=run_id, node_id=node_id, node_config={}, state=RecordDict(), run_config={})
            push_message(client, Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=message),
                         context)
        push_task_output(client, None, SubStatus.FAILED, reason)  # None: the run's context stays as it was
        return True
    except Exception:  # noqa: BLE001 - the SuperNode may be gone as well
        log.exception("could not answer for the stopped task of run %d", run_id)
        return False
    finally:
        client.close()
