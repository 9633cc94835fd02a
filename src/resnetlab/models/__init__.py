"""The ResNet model family: blocks, one configurable ResNet, the keyword-spotting nets and the registry."""

from resnetlab.models.blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck
from resnetlab.models.fast import FastResNet
from resnetlab.models.info import model_info
from resnetlab.models.kws import KWSResNet
from resnetlab.models.pretrained import LoadReport, load_pretrained, model_from_pretrained
from resnetlab.models.registry import ModelSpec, create_model, get_spec, list_models, register_model
from resnetlab.models.resnet import ClassifierBase, ResNet
from resnetlab.models.weights import list_weights, resolve_source

__all__ = ["BasicBlock", "Bottleneck", "PreActBasicBlock", "PreActBottleneck", "ResNet", "KWSResNet", "FastResNet",
           "ClassifierBase", "ModelSpec", "create_model", "get_spec", "list_models", "register_model", "model_info",
           "LoadReport", "load_pretrained", "model_from_pretrained", "list_weights", "resolve_source"]
