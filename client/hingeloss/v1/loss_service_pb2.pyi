from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]

class Reduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCTION_UNSPECIFIED: _ClassVar[Reduction]
    REDUCTION_MEAN: _ClassVar[Reduction]
    REDUCTION_SUM: _ClassVar[Reduction]
    REDUCTION_NONE: _ClassVar[Reduction]
    REDUCTION_WEIGHTED_MEAN: _ClassVar[Reduction]

class GradientFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRADIENT_FORMAT_UNSPECIFIED: _ClassVar[GradientFormat]
    GRADIENT_FORMAT_DENSE: _ClassVar[GradientFormat]
    GRADIENT_FORMAT_ROW_SPARSE: _ClassVar[GradientFormat]
    GRADIENT_FORMAT_NONE: _ClassVar[GradientFormat]
    GRADIENT_FORMAT_FACTORED: _ClassVar[GradientFormat]

class KinkSubgradient(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KINK_SUBGRADIENT_UNSPECIFIED: _ClassVar[KinkSubgradient]
    KINK_SUBGRADIENT_ZERO: _ClassVar[KinkSubgradient]
    KINK_SUBGRADIENT_ONE: _ClassVar[KinkSubgradient]

class LabelEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_ENCODING_UNSPECIFIED: _ClassVar[LabelEncoding]
    LABEL_ENCODING_PLUS_MINUS_ONE: _ClassVar[LabelEncoding]
    LABEL_ENCODING_ZERO_ONE: _ClassVar[LabelEncoding]

class ClassNormalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLASS_NORMALIZATION_UNSPECIFIED: _ClassVar[ClassNormalization]
    CLASS_NORMALIZATION_SUM_OVER_CLASSES: _ClassVar[ClassNormalization]
    CLASS_NORMALIZATION_DIVIDE_BY_NUM_CLASSES: _ClassVar[ClassNormalization]

class TieBreak(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIE_BREAK_UNSPECIFIED: _ClassVar[TieBreak]
    TIE_BREAK_FIRST_INDEX: _ClassVar[TieBreak]
    TIE_BREAK_SPLIT_EVENLY: _ClassVar[TieBreak]

class GanCombine(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GAN_COMBINE_UNSPECIFIED: _ClassVar[GanCombine]
    GAN_COMBINE_SUM_OF_MEANS: _ClassVar[GanCombine]
    GAN_COMBINE_POOLED_MEAN: _ClassVar[GanCombine]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
REDUCTION_UNSPECIFIED: Reduction
REDUCTION_MEAN: Reduction
REDUCTION_SUM: Reduction
REDUCTION_NONE: Reduction
REDUCTION_WEIGHTED_MEAN: Reduction
GRADIENT_FORMAT_UNSPECIFIED: GradientFormat
GRADIENT_FORMAT_DENSE: GradientFormat
GRADIENT_FORMAT_ROW_SPARSE: GradientFormat
GRADIENT_FORMAT_NONE: GradientFormat
GRADIENT_FORMAT_FACTORED: GradientFormat
KINK_SUBGRADIENT_UNSPECIFIED: KinkSubgradient
KINK_SUBGRADIENT_ZERO: KinkSubgradient
KINK_SUBGRADIENT_ONE: KinkSubgradient
LABEL_ENCODING_UNSPECIFIED: LabelEncoding
LABEL_ENCODING_PLUS_MINUS_ONE: LabelEncoding
LABEL_ENCODING_ZERO_ONE: LabelEncoding
CLASS_NORMALIZATION_UNSPECIFIED: ClassNormalization
CLASS_NORMALIZATION_SUM_OVER_CLASSES: ClassNormalization
CLASS_NORMALIZATION_DIVIDE_BY_NUM_CLASSES: ClassNormalization
TIE_BREAK_UNSPECIFIED: TieBreak
TIE_BREAK_FIRST_INDEX: TieBreak
TIE_BREAK_SPLIT_EVENLY: TieBreak
GAN_COMBINE_UNSPECIFIED: GanCombine
GAN_COMBINE_SUM_OF_MEANS: GanCombine
GAN_COMBINE_POOLED_MEAN: GanCombine

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class BinaryHinge(_message.Message):
    __slots__ = ("scores", "labels", "label_encoding", "margin", "power", "kink_subgradient")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LABEL_ENCODING_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    POWER_FIELD_NUMBER: _ClassVar[int]
    KINK_SUBGRADIENT_FIELD_NUMBER: _ClassVar[int]
    scores: Tensor
    labels: Tensor
    label_encoding: LabelEncoding
    margin: float
    power: int
    kink_subgradient: KinkSubgradient
    def __init__(self, scores: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., label_encoding: _Optional[_Union[LabelEncoding, str]] = ..., margin: _Optional[float] = ..., power: _Optional[int] = ..., kink_subgradient: _Optional[_Union[KinkSubgradient, str]] = ...) -> None: ...

class MulticlassHinge(_message.Message):
    __slots__ = ("scores", "targets", "margin", "power", "target_class_weights", "class_normalization", "ignore_index", "kink_subgradient")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    POWER_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    IGNORE_INDEX_FIELD_NUMBER: _ClassVar[int]
    KINK_SUBGRADIENT_FIELD_NUMBER: _ClassVar[int]
    scores: Tensor
    targets: Tensor
    margin: float
    power: int
    target_class_weights: Tensor
    class_normalization: ClassNormalization
    ignore_index: int
    kink_subgradient: KinkSubgradient
    def __init__(self, scores: _Optional[_Union[Tensor, _Mapping]] = ..., targets: _Optional[_Union[Tensor, _Mapping]] = ..., margin: _Optional[float] = ..., power: _Optional[int] = ..., target_class_weights: _Optional[_Union[Tensor, _Mapping]] = ..., class_normalization: _Optional[_Union[ClassNormalization, str]] = ..., ignore_index: _Optional[int] = ..., kink_subgradient: _Optional[_Union[KinkSubgradient, str]] = ...) -> None: ...

class CrammerSinger(_message.Message):
    __slots__ = ("scores", "targets", "margin", "power", "tie_break", "kink_subgradient")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    POWER_FIELD_NUMBER: _ClassVar[int]
    TIE_BREAK_FIELD_NUMBER: _ClassVar[int]
    KINK_SUBGRADIENT_FIELD_NUMBER: _ClassVar[int]
    scores: Tensor
    targets: Tensor
    margin: float
    power: int
    tie_break: TieBreak
    kink_subgradient: KinkSubgradient
    def __init__(self, scores: _Optional[_Union[Tensor, _Mapping]] = ..., targets: _Optional[_Union[Tensor, _Mapping]] = ..., margin: _Optional[float] = ..., power: _Optional[int] = ..., tie_break: _Optional[_Union[TieBreak, str]] = ..., kink_subgradient: _Optional[_Union[KinkSubgradient, str]] = ...) -> None: ...

class GanDiscriminator(_message.Message):
    __slots__ = ("real_scores", "fake_scores", "combine", "kink_subgradient")
    REAL_SCORES_FIELD_NUMBER: _ClassVar[int]
    FAKE_SCORES_FIELD_NUMBER: _ClassVar[int]
    COMBINE_FIELD_NUMBER: _ClassVar[int]
    KINK_SUBGRADIENT_FIELD_NUMBER: _ClassVar[int]
    real_scores: Tensor
    fake_scores: Tensor
    combine: GanCombine
    kink_subgradient: KinkSubgradient
    def __init__(self, real_scores: _Optional[_Union[Tensor, _Mapping]] = ..., fake_scores: _Optional[_Union[Tensor, _Mapping]] = ..., combine: _Optional[_Union[GanCombine, str]] = ..., kink_subgradient: _Optional[_Union[KinkSubgradient, str]] = ...) -> None: ...

class GanGenerator(_message.Message):
    __slots__ = ("fake_scores",)
    FAKE_SCORES_FIELD_NUMBER: _ClassVar[int]
    fake_scores: Tensor
    def __init__(self, fake_scores: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class MarginRanking(_message.Message):
    __slots__ = ("scores_a", "scores_b", "labels", "margin", "kink_subgradient")
    SCORES_A_FIELD_NUMBER: _ClassVar[int]
    SCORES_B_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    KINK_SUBGRADIENT_FIELD_NUMBER: _ClassVar[int]
    scores_a: Tensor
    scores_b: Tensor
    labels: Tensor
    margin: float
    kink_subgradient: KinkSubgradient
    def __init__(self, scores_a: _Optional[_Union[Tensor, _Mapping]] = ..., scores_b: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., margin: _Optional[float] = ..., kink_subgradient: _Optional[_Union[KinkSubgradient, str]] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("request_id", "binary_hinge", "multiclass_hinge", "crammer_singer", "gan_discriminator", "gan_generator", "margin_ranking", "reduction", "gradient_format", "return_per_sample", "sample_weights")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BINARY_HINGE_FIELD_NUMBER: _ClassVar[int]
    MULTICLASS_HINGE_FIELD_NUMBER: _ClassVar[int]
    CRAMMER_SINGER_FIELD_NUMBER: _ClassVar[int]
    GAN_DISCRIMINATOR_FIELD_NUMBER: _ClassVar[int]
    GAN_GENERATOR_FIELD_NUMBER: _ClassVar[int]
    MARGIN_RANKING_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    RETURN_PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    binary_hinge: BinaryHinge
    multiclass_hinge: MulticlassHinge
    crammer_singer: CrammerSinger
    gan_discriminator: GanDiscriminator
    gan_generator: GanGenerator
    margin_ranking: MarginRanking
    reduction: Reduction
    gradient_format: GradientFormat
    return_per_sample: bool
    sample_weights: Tensor
    def __init__(self, request_id: _Optional[str] = ..., binary_hinge: _Optional[_Union[BinaryHinge, _Mapping]] = ..., multiclass_hinge: _Optional[_Union[MulticlassHinge, _Mapping]] = ..., crammer_singer: _Optional[_Union[CrammerSinger, _Mapping]] = ..., gan_discriminator: _Optional[_Union[GanDiscriminator, _Mapping]] = ..., gan_generator: _Optional[_Union[GanGenerator, _Mapping]] = ..., margin_ranking: _Optional[_Union[MarginRanking, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., gradient_format: _Optional[_Union[GradientFormat, str]] = ..., return_per_sample: _Optional[bool] = ..., sample_weights: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class UploadPart(_message.Message):
    __slots__ = ("request", "data")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    request: ComputeRequest
    data: bytes
    def __init__(self, request: _Optional[_Union[ComputeRequest, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Gradient(_message.Message):
    __slots__ = ("input", "dense", "row_sparse", "factored")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    ROW_SPARSE_FIELD_NUMBER: _ClassVar[int]
    FACTORED_FIELD_NUMBER: _ClassVar[int]
    input: str
    dense: Tensor
    row_sparse: RowSparseTensor
    factored: FactoredGradient
    def __init__(self, input: _Optional[str] = ..., dense: _Optional[_Union[Tensor, _Mapping]] = ..., row_sparse: _Optional[_Union[RowSparseTensor, _Mapping]] = ..., factored: _Optional[_Union[FactoredGradient, _Mapping]] = ...) -> None: ...

class RowSparseTensor(_message.Message):
    __slots__ = ("dense_shape", "indices", "values")
    DENSE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    dense_shape: _containers.RepeatedScalarFieldContainer[int]
    indices: Tensor
    values: Tensor
    def __init__(self, dense_shape: _Optional[_Iterable[int]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class FactoredGradient(_message.Message):
    __slots__ = ("dense_shape", "dtype", "mask", "row_values")
    DENSE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    ROW_VALUES_FIELD_NUMBER: _ClassVar[int]
    dense_shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    mask: bytes
    row_values: Tensor
    def __init__(self, dense_shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., mask: _Optional[bytes] = ..., row_values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Sparsity(_message.Message):
    __slots__ = ("samples", "active_samples")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: int
    active_samples: int
    def __init__(self, samples: _Optional[int] = ..., active_samples: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_us", "compute_us", "batch_rows", "batch_requests", "device")
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    queue_us: int
    compute_us: int
    batch_rows: int
    batch_requests: int
    device: str
    def __init__(self, queue_us: _Optional[int] = ..., compute_us: _Optional[int] = ..., batch_rows: _Optional[int] = ..., batch_requests: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class ResolvedOptions(_message.Message):
    __slots__ = ("loss", "reduction", "gradient_format", "margin", "power", "kink_subgradient", "label_encoding", "class_normalization", "tie_break", "gan_combine", "compute_dtype")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    POWER_FIELD_NUMBER: _ClassVar[int]
    KINK_SUBGRADIENT_FIELD_NUMBER: _ClassVar[int]
    LABEL_ENCODING_FIELD_NUMBER: _ClassVar[int]
    CLASS_NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    TIE_BREAK_FIELD_NUMBER: _ClassVar[int]
    GAN_COMBINE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    loss: str
    reduction: Reduction
    gradient_format: GradientFormat
    margin: float
    power: int
    kink_subgradient: KinkSubgradient
    label_encoding: LabelEncoding
    class_normalization: ClassNormalization
    tie_break: TieBreak
    gan_combine: GanCombine
    compute_dtype: DType
    def __init__(self, loss: _Optional[str] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., gradient_format: _Optional[_Union[GradientFormat, str]] = ..., margin: _Optional[float] = ..., power: _Optional[int] = ..., kink_subgradient: _Optional[_Union[KinkSubgradient, str]] = ..., label_encoding: _Optional[_Union[LabelEncoding, str]] = ..., class_normalization: _Optional[_Union[ClassNormalization, str]] = ..., tie_break: _Optional[_Union[TieBreak, str]] = ..., gan_combine: _Optional[_Union[GanCombine, str]] = ..., compute_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("request_id", "loss", "gradients", "per_sample_losses", "sparsity", "timing", "resolved")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    PER_SAMPLE_LOSSES_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    loss: float
    gradients: _containers.RepeatedCompositeFieldContainer[Gradient]
    per_sample_losses: _containers.RepeatedCompositeFieldContainer[Tensor]
    sparsity: Sparsity
    timing: Timing
    resolved: ResolvedOptions
    def __init__(self, request_id: _Optional[str] = ..., loss: _Optional[float] = ..., gradients: _Optional[_Iterable[_Union[Gradient, _Mapping]]] = ..., per_sample_losses: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., sparsity: _Optional[_Union[Sparsity, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., resolved: _Optional[_Union[ResolvedOptions, _Mapping]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "losses", "score_dtypes", "devices", "workers", "limits", "torch_version", "grpc_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    SCORE_DTYPES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    GRPC_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    losses: _containers.RepeatedScalarFieldContainer[str]
    score_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    devices: _containers.RepeatedScalarFieldContainer[str]
    workers: int
    limits: ServerLimits
    torch_version: str
    grpc_version: str
    def __init__(self, version: _Optional[str] = ..., losses: _Optional[_Iterable[str]] = ..., score_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., devices: _Optional[_Iterable[str]] = ..., workers: _Optional[int] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., torch_version: _Optional[str] = ..., grpc_version: _Optional[str] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_message_bytes", "max_request_rows", "max_request_elements", "max_batch_rows", "max_queue_rows", "max_queue_bytes", "max_dims", "max_request_bytes", "max_batch_bytes")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DIMS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_request_rows: int
    max_request_elements: int
    max_batch_rows: int
    max_queue_rows: int
    max_queue_bytes: int
    max_dims: int
    max_request_bytes: int
    max_batch_bytes: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_request_rows: _Optional[int] = ..., max_request_elements: _Optional[int] = ..., max_batch_rows: _Optional[int] = ..., max_queue_rows: _Optional[int] = ..., max_queue_bytes: _Optional[int] = ..., max_dims: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., max_batch_bytes: _Optional[int] = ...) -> None: ...
