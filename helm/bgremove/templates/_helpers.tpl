{{/* Names: every object is "<release>-bgremove-<component>" unless overridden; 63 characters at most. */}}
{{- define "bgremove.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "bgremove.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Component names leave room for the suffix a Deployment adds to its pods. */}}
{{- define "bgremove.gateway.fullname" -}}
{{- printf "%s-gateway" (include "bgremove.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}

{{- define "bgremove.triton.fullname" -}}
{{- printf "%s-triton" (include "bgremove.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}

{{- define "bgremove.triton.headless" -}}
{{- printf "%s-headless" (include "bgremove.triton.fullname" .) }}
{{- end }}

{{- define "bgremove.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels. Call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "bgremove.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bgremove.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "bgremove.labels" -}}
helm.sh/chart: {{ include "bgremove.chart" .ctx }}
{{ include "bgremove.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: bgremove
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest. Call with (dict "image" .Values.x.image "default" "tag"). */}}
{{- define "bgremove.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .default .image.tag) -}}
{{- end -}}
{{- end }}

{{- define "bgremove.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "bgremove.gateway.fullname" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "bgremove.triton.serviceAccountName" -}}
{{- if .Values.triton.serviceAccount.create }}
{{- default (include "bgremove.triton.fullname" .) .Values.triton.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.triton.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "bgremove.gateway.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "bgremove.gateway.fullname" .)) .Values.gateway.tls.existingSecret }}
{{- end }}

{{- define "bgremove.triton.adminKeySecretName" -}}
{{- default (printf "%s-admin-key" (include "bgremove.triton.fullname" .)) .Values.triton.adminKey.existingSecret }}
{{- end }}

{{/* Where the gateway finds the Triton admin key (a file from the Secret, never an argument). */}}
{{- define "bgremove.triton.adminKeyPath" -}}
{{- printf "/etc/bgremove/triton-admin/%s" .Values.triton.adminKey.existingSecretKey }}
{{- end }}

{{- define "bgremove.gateway.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "bgremove.gateway.fullname" .)) .Values.gateway.auth.existingSecret }}
{{- end }}

{{/* The address the gateway dials: the headless Service, resolved by the gateway to every Triton pod. */}}
{{- define "bgremove.triton.url" -}}
{{- printf "%s.%s.svc.%s:%d" (include "bgremove.triton.headless" .) .Release.Namespace .Values.clusterDomain (int .Values.triton.ports.grpc) }}
{{- end }}

{{/*
Spread and anti-affinity for one workload. Call with (dict "ctx" $ "component" "gateway" "cfg" .Values.gateway).
pod-template-hash in matchLabelKeys makes the spread count only pods of the same revision, so a
rolling update cannot be blocked by the old ReplicaSet's pods.
*/}}
{{- define "bgremove.spread" -}}
topologySpreadConstraints:
  - topologyKey: topology.kubernetes.io/zone
    maxSkew: {{ .cfg.topologySpread.zone.maxSkew }}
    whenUnsatisfiable: {{ .cfg.topologySpread.zone.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "bgremove.selectorLabels" . | nindent 8 }}
    matchLabelKeys:
      - pod-template-hash
  - topologyKey: kubernetes.io/hostname
    maxSkew: {{ .cfg.topologySpread.hostname.maxSkew }}
    whenUnsatisfiable: {{ .cfg.topologySpread.hostname.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "bgremove.selectorLabels" . | nindent 8 }}
    matchLabelKeys:
      - pod-template-hash
{{- if eq .cfg.podAntiAffinity "soft" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "bgremove.selectorLabels" . | nindent 14 }}
{{- else if eq .cfg.podAntiAffinity "hard" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "bgremove.selectorLabels" . | nindent 12 }}
{{- end }}
{{- end }}

{{/* Restricted pod security: https://kubernetes.io/docs/concepts/security/pod-security-standards/ */}}
{{- define "bgremove.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Checks JSON Schema cannot express because they relate two values. A failed install is better than
a PodDisruptionBudget that blocks every node drain or a grace period that kills in-flight requests.
*/}}
{{- define "bgremove.validate" -}}
{{- $g := .Values.gateway }}
{{- $t := .Values.triton }}
{{- if le (int $g.terminationGracePeriodSeconds) (add (int $g.preStopSleepSeconds) (int $g.drainSeconds)) }}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%d) must be greater than gateway.preStopSleepSeconds (%d) + gateway.drainSeconds (%d), or Kubernetes kills the gateway before in-flight requests finish" (int $g.terminationGracePeriodSeconds) (int $g.preStopSleepSeconds) (int $g.drainSeconds)) }}
{{- end }}
{{- if le (int $t.terminationGracePeriodSeconds) (add (int $t.preStopSleepSeconds) (int $t.exitTimeoutSeconds)) }}
{{- fail (printf "triton.terminationGracePeriodSeconds (%d) must be greater than triton.preStopSleepSeconds (%d) + triton.exitTimeoutSeconds (%d), or Kubernetes kills Triton before in-flight requests finish" (int $t.terminationGracePeriodSeconds) (int $t.preStopSleepSeconds) (int $t.exitTimeoutSeconds)) }}
{{- end }}
{{- range $component, $cfg := dict "gateway" $g "triton" $t }}
{{- if $cfg.podDisruptionBudget.enabled }}
{{- $floor := ternary $cfg.autoscaling.minReplicas $cfg.replicaCount $cfg.autoscaling.enabled }}
{{- if le (int $floor) (int $cfg.podDisruptionBudget.minAvailable) }}
{{- fail (printf "%s.podDisruptionBudget.minAvailable (%d) must be lower than the %s replica count (%d), or no node holding one can ever be drained" $component (int $cfg.podDisruptionBudget.minAvailable) $component (int $floor)) }}
{{- end }}
{{- end }}
{{- if and $cfg.autoscaling.enabled (gt (int $cfg.autoscaling.minReplicas) (int $cfg.autoscaling.maxReplicas)) }}
{{- fail (printf "%s.autoscaling.minReplicas (%d) must not exceed %s.autoscaling.maxReplicas (%d)" $component (int $cfg.autoscaling.minReplicas) $component (int $cfg.autoscaling.maxReplicas)) }}
{{- end }}
{{- if and $cfg.autoscaling.enabled (not (dig "requests" "cpu" "" $cfg.resources)) }}
{{- fail (printf "%s.autoscaling needs %s.resources.requests.cpu: CPU utilisation is measured against the request" $component $component) }}
{{- end }}
{{- end }}
{{- if and $g.tls.enabled $g.tls.clientAuth (eq $g.tls.probe "tls") }}
{{- fail "gateway.tls.probe=tls cannot work with gateway.tls.clientAuth: the kubelet has no client certificate; use gateway.tls.probe=healthPort" }}
{{- end }}
{{- if and $g.tls.enabled (eq $g.tls.probe "healthPort") (eq (int $g.tls.healthPort) (int $g.port)) }}
{{- fail "gateway.tls.healthPort must differ from gateway.port" }}
{{- end }}
{{- if not (has $g.defaultModel $t.models) }}
{{- fail (printf "gateway.defaultModel (%s) must be one of triton.models (%s), or every request that names no model fails" $g.defaultModel (join ", " $t.models)) }}
{{- end }}
{{- end }}
