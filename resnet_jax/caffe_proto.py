"""Caffe's weight files (.caffemodel: NetParameter, .binaryproto: BlobProto) read and written.

The message types are the part of Caffe's caffe.proto that holds weights, with its field numbers,
built from descriptors: no Caffe install or protoc is needed, and fields outside this subset (layer
settings) are skipped when reading.
"""

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
_TYPES = {
  'int32': descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
  'int64': descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
  'float': descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
  'double': descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
  'string': descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
}
# message -> (label, type, name, number): caffe.proto's numbers, so real files parse.
_MESSAGES = {
  'BlobShape': [
    ('repeated', 'int64', 'dim', 1),
  ],
  'BlobProto': [
    ('optional', 'BlobShape', 'shape', 7),
    ('repeated', 'float', 'data', 5),
    ('repeated', 'float', 'diff', 6),
    ('repeated', 'double', 'double_data', 8),
    ('repeated', 'double', 'double_diff', 9),
    ('optional', 'int32', 'num', 1),  # the 4-D shape of files older than BlobShape
    ('optional', 'int32', 'channels', 2),
    ('optional', 'int32', 'height', 3),
    ('optional', 'int32', 'width', 4),
  ],
  'LayerParameter': [
    ('optional', 'string', 'name', 1),
    ('optional', 'string', 'type', 2),
    ('repeated', 'string', 'bottom', 3),
    ('repeated', 'string', 'top', 4),
    ('repeated', 'BlobProto', 'blobs', 7),
  ],
  'V1LayerParameter': [  # files written before 2015 ('layers' instead of 'layer')
    ('repeated', 'string', 'bottom', 2),
    ('repeated', 'string', 'top', 3),
    ('optional', 'string', 'name', 4),
    ('optional', 'int32', 'type', 5),  # an enum in caffe.proto: same varint on the wire
    ('repeated', 'BlobProto', 'blobs', 6),
  ],
  'NetParameter': [
    ('optional', 'string', 'name', 1),
    ('repeated', 'V1LayerParameter', 'layers', 2),
    ('repeated', 'string', 'input', 3),
    ('repeated', 'int32', 'input_dim', 4),
    ('repeated', 'BlobShape', 'input_shape', 8),
    ('repeated', 'LayerParameter', 'layer', 100),
  ],
}


def _build():
  file_proto = descriptor_pb2.FileDescriptorProto(
    name='resnet_jax_caffe.proto', package='caffe', syntax='proto2'
  )
  for message_name, fields in _MESSAGES.items():
    message = file_proto.message_type.add(name=message_name)
    for label, type_name, name, number in fields:
      field = message.field.add(
        name=name, number=number, label=_REPEATED if label == 'repeated' else _OPTIONAL
      )
      if type_name in _TYPES:
        field.type = _TYPES[type_name]
        if label == 'repeated' and type_name != 'string':
          field.options.packed = True
      else:
        field.type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
        field.type_name = f'.caffe.{type_name}'
  pool = descriptor_pool.DescriptorPool()  # private: no clash with an installed caffe_pb2
  pool.Add(file_proto)
  return {
    name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f'caffe.{name}'))
    for name in _MESSAGES
  }


_CLASSES = _build()
BlobShape = _CLASSES['BlobShape']
BlobProto = _CLASSES['BlobProto']
LayerParameter = _CLASSES['LayerParameter']
V1LayerParameter = _CLASSES['V1LayerParameter']
NetParameter = _CLASSES['NetParameter']


def blob_to_array(blob):
  """A BlobProto's values as float32 in its shape (the legacy 4-D one when it has no BlobShape)."""
  values = blob.double_data if len(blob.double_data) else blob.data
  data = np.asarray(values, np.float32)
  if blob.HasField('shape'):
    shape = tuple(blob.shape.dim)
  else:
    shape = (blob.num, blob.channels, blob.height, blob.width)
  if int(np.prod(shape)) != data.size:
    raise ValueError(f'a blob of shape {shape} holds {data.size} values')
  return data.reshape(shape)


def array_to_blob(array):
  """A BlobProto holding `array` as float32 with its shape."""
  array = np.asarray(array, np.float32)
  blob = BlobProto()
  blob.shape.dim.extend(array.shape)
  blob.data.extend(array.ravel().tolist())
  return blob


def read_net(data):
  """A NetParameter parsed from bytes; google.protobuf.message.DecodeError if it is not one."""
  net = NetParameter()
  net.ParseFromString(data)
  return net


def layer_blobs(net):
  """{layer name: [arrays]} of every layer with weights, new-style and V1 layers alike."""
  return {
    layer.name: [blob_to_array(blob) for blob in layer.blobs]
    for layer in (*net.layer, *net.layers)
    if len(layer.blobs)
  }


def write_net(layers, name=''):
  """Bytes of a NetParameter with one LayerParameter per (name, type, [arrays])."""
  net = NetParameter(name=name)
  for layer_name, layer_type, arrays in layers:
    layer = net.layer.add(name=layer_name, type=layer_type)
    layer.blobs.extend(array_to_blob(array) for array in arrays)
  return net.SerializeToString()
